//! Signed job envelopes (`order::Orders::admit`, `mqtt::contract::parse_order`):
//! any payload on a job topic of an agent with the manager's key and of one
//! without, and any job string the manager (or someone else) signed.
//!
//! What must hold: nothing panics; an agent with the key admits only what
//! the manager's key signed, for this node, under the topic's job id,
//! within its validity (clock skew included); the same bytes signed by
//! another key, or with a flipped signature bit, are never admitted; what
//! the keyless agent admits as signed obeys the same node, id and time
//! rules; and a bare job is admitted exactly when `parse_job` takes it.
#![no_main]

use std::sync::OnceLock;

use ferry_agent::mqtt::contract::{parse_job, validate_id, Envelope, JobRequest};
use ferry_agent::mqtt::JobLedger;
use ferry_agent::order::{ManagerKey, Orders, CLOCK_SKEW, MAX_LIFETIME};
use libfuzzer_sys::fuzz_target;

const NODE: &str = "node1";
const NOW: u64 = 1_800_000_000;

struct Keys {
    manager: ManagerKey,
    stranger: ManagerKey,
    signed: Orders,
    open: Orders,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let manager = ManagerKey::from_seed(&[7; 32]);
        // `admit` never touches the ledger (only `admit_prepare` does); it
        // lives in the run's scratch dir.
        let dir = std::env::temp_dir().join(format!("signed-job-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let ledger = JobLedger::open(dir.join("ledger")).expect("ledger");
        Keys {
            signed: Orders::signed(manager.public(), ledger),
            manager,
            stranger: ManagerKey::from_seed(&[9; 32]),
            open: Orders::open(),
        }
    })
}

fn payload(e: &Envelope) -> Vec<u8> {
    serde_json::to_vec(e).expect("envelope serializes")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((&id_len, rest)) = rest.split_first() else {
        return;
    };
    let (id, rest) = rest.split_at((id_len as usize % 24).min(rest.len()));
    let id = String::from_utf8_lossy(id).into_owned();
    // When the job is checked, relative to NOW (± a day and a bit).
    let shift = i64::from(mode >> 2) * 3_600 - 100_000 + i64::from(id_len) * 7;
    let now = NOW.saturating_add_signed(shift);
    let k = keys();

    match mode % 4 {
        // Raw payloads: the agent with the key admits nothing it did not
        // sign (the fuzzer cannot forge); the keyless one only bare jobs
        // `parse_job` takes, or envelopes that are right for here and now.
        0 => {
            assert!(
                k.signed.admit(NODE, &id, rest, now).is_err(),
                "admitted an unsigned or forged payload"
            );
            if let Ok(order) = k.open.admit(NODE, &id, rest, now) {
                match &order.signed {
                    None => assert_eq!(parse_job(NODE, &id, rest).as_ref(), Ok(&order.request)),
                    Some((_, v)) => check_validity(v.issued_at, v.expires_at, now),
                }
                check_request(&order.request, &id);
            }
        }
        // The manager signed this job string: admitted exactly when the
        // keyless agent admits it (same shape and time rules).
        1 => {
            let job = String::from_utf8_lossy(rest).into_owned();
            let envelope = k.manager.sign_text(job);
            let with_key = k.signed.admit(NODE, &id, &payload(&envelope), now);
            let without = k.open.admit(NODE, &id, &payload(&envelope), now);
            assert_eq!(
                with_key.is_ok(),
                without.is_ok(),
                "{with_key:?} / {without:?}"
            );
            if let Ok(order) = with_key {
                let (back, v) = order.signed.expect("admitted as signed");
                assert_eq!(back, envelope);
                check_validity(v.issued_at, v.expires_at, now);
                check_request(&order.request, &id);
            }
        }
        // Another key signed it, or a bit of the manager's signature flipped.
        _ => {
            let job = String::from_utf8_lossy(rest).into_owned();
            let mut envelope = if mode % 4 == 2 {
                k.stranger.sign_text(job)
            } else {
                let mut e = k.manager.sign_text(job);
                let mut sig = e.sig.into_bytes();
                // Flip within the base64 alphabet: 'A' <-> 'B' etc.
                let i = id_len as usize % 86;
                sig[i] = if sig[i] == b'A' { b'B' } else { b'A' };
                e.sig = String::from_utf8(sig).expect("ascii");
                e
            };
            if mode & 0x80 != 0 {
                // The envelope may claim the manager's key id: no matter.
                envelope.key_id = Some(k.manager.id());
            }
            assert!(
                k.signed.admit(NODE, &id, &payload(&envelope), now).is_err(),
                "admitted a job not signed by the manager"
            );
        }
    }
});

fn check_validity(issued_at: u64, expires_at: u64, now: u64) {
    let skew = CLOCK_SKEW.as_secs();
    assert!(issued_at < expires_at);
    assert!(expires_at - issued_at <= MAX_LIFETIME.as_secs());
    assert!(issued_at <= now + skew, "admitted before its time");
    assert!(now <= expires_at + skew, "admitted after expiry");
}

fn check_request(request: &JobRequest, id: &str) {
    validate_id("job id", id).expect("admitted job id is valid");
    match request {
        JobRequest::Migrate {
            container, target, ..
        } => {
            validate_id("container", container).expect("valid container");
            validate_id("target", target).expect("valid target");
            assert_ne!(target, NODE);
        }
        JobRequest::Cancel { job } => {
            validate_id("job", job).expect("valid job");
            assert_ne!(job, id);
        }
    }
}
