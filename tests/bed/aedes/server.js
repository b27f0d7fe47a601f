// A second MQTT broker for ferry's tests: aedes (MQTT 3.1.1), plain TCP,
// anonymous, in-memory persistence (sessions, queued QoS 1 messages,
// retained messages and wills live as long as the process).
//
//   node server.js [--log FILE] HOST:PORT [HOST ...]
//
// Listens on HOST:PORT (PORT 0: a free port), then on the same port of every
// further HOST. Prints `listening HOST:PORT` for each, then `ready`, on
// stdout; connections and errors go to FILE (appended), else to stderr.
// SIGTERM or SIGINT close it.
// Started by tests/bed/bed (`up N --broker aedes`) and tests/common/broker.rs.
import fs from 'node:fs'
import net from 'node:net'
import { Aedes } from 'aedes'

const args = process.argv.slice(2)
const logFile = args[0] === '--log' ? args.splice(0, 2)[1] : null
const [first, ...more] = args
const m = /^(.+):(\d+)$/.exec(first ?? '')
if (!m) {
  console.error('usage: node server.js [--log FILE] HOST:PORT [HOST ...]')
  process.exit(2)
}
const out = logFile ? fs.createWriteStream(logFile, { flags: 'a' }) : process.stderr
const log = (...a) => out.write(`${new Date().toISOString()} ${a.join(' ')}\n`)
const broker = await Aedes.createBroker({ drainTimeout: 30000 })
broker.on('client', (c) => log('connect', c.id))
broker.on('clientDisconnect', (c) => log('disconnect', c.id))
broker.on('clientError', (c, e) => log('client error', c.id, e.message))
broker.on('connectionError', (c, e) => log('connection error', e.message))

const servers = []
const listen = (host, port) => new Promise((resolve, reject) => {
  const s = net.createServer(broker.handle)
  s.once('error', reject)
  s.listen(port, host, () => { servers.push(s); resolve(s.address().port) })
})
const port = await listen(m[1], Number(m[2]))
console.log(`listening ${m[1]}:${port}`)
for (const host of more) console.log(`listening ${host}:${await listen(host, port)}`)
console.log('ready')

const stop = () => {
  for (const s of servers) s.close()
  broker.close(() => process.exit(0))
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
