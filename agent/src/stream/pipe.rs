//! Bounded byte pipes between a blocking thread (tar, zstd) and async code.
//!
//! Memory stays bounded whatever the checkpoint's size: at most the channel's
//! capacity in chunks is in flight, and a full channel blocks the producer.

use std::io::{self, Read, Write};

use tokio::sync::mpsc;

/// Largest chunk handed over; also the largest frame on the wire.
pub(crate) const CHUNK: usize = 256 * 1024;
/// Chunks in flight per pipe (8 × 256 KiB = 2 MiB).
pub(crate) const DEPTH: usize = 8;

/// What the async side feeds a [`ChannelReader`].
#[derive(Debug)]
pub(crate) enum Feed {
    Data(Vec<u8>),
    /// The body ended normally. A channel closed without it is an abort.
    End,
}

/// `Write` end used on a blocking thread: collects bytes into chunks of
/// [`CHUNK`] and sends them; fails once the async side has gone away.
pub(crate) struct ChannelWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    pub(crate) fn new(tx: mpsc::Sender<Vec<u8>>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "transfer aborted"))
    }

    /// Sends what is still buffered; dropping the writer then ends the stream.
    pub(crate) fn finish(mut self) -> io::Result<()> {
        self.send_buf()
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Chunks go out when full or on `finish`; small flushes would only
        // make small frames.
        Ok(())
    }
}

/// `Read` end used on a blocking thread.
pub(crate) struct ChannelReader {
    rx: mpsc::Receiver<Feed>,
    chunk: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl ChannelReader {
    pub(crate) fn new(rx: mpsc::Receiver<Feed>) -> Self {
        ChannelReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
            ended: false,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Feed::Data(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Some(Feed::End) => self.ended = true,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "transfer aborted before the end of the body",
                    ))
                }
            }
        }
        let n = out.len().min(self.chunk.len() - self.pos);
        out[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_chunks_and_reader_reassembles() {
        let (tx, mut rx) = mpsc::channel(DEPTH);
        let data: Vec<u8> = (0..CHUNK * 2 + 10).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let producer = std::thread::spawn(move || {
            let mut w = ChannelWriter::new(tx);
            w.write_all(&data).unwrap();
            w.finish().unwrap();
        });
        let mut sizes = Vec::new();
        let (ftx, frx) = mpsc::channel(DEPTH * 4);
        while let Some(chunk) = rx.blocking_recv() {
            sizes.push(chunk.len());
            ftx.blocking_send(Feed::Data(chunk)).unwrap();
        }
        producer.join().unwrap();
        assert_eq!(sizes, vec![CHUNK, CHUNK, 10]);
        ftx.blocking_send(Feed::End).unwrap();
        let mut got = Vec::new();
        ChannelReader::new(frx).read_to_end(&mut got).unwrap();
        assert_eq!(got, expected);
    }

    #[test]
    fn reader_without_end_is_an_abort() {
        let (ftx, frx) = mpsc::channel(1);
        ftx.blocking_send(Feed::Data(b"abc".to_vec())).unwrap();
        drop(ftx);
        let mut got = Vec::new();
        let err = ChannelReader::new(frx).read_to_end(&mut got).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(got, b"abc");
    }

    #[test]
    fn writer_fails_once_the_reader_is_gone() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut w = ChannelWriter::new(tx);
        let err = w.write_all(&vec![0u8; CHUNK]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
