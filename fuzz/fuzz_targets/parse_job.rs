//! `mqtt::contract::parse_job`: any payload on any job topic. What parses
//! must carry only ids that are safe as topic levels and file names, and
//! must survive a round trip through the contract's own serialization.
#![no_main]

use ferry_agent::mqtt::contract::{parse_job, validate_id, JobRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte says how much of the rest is the job id (the topic's
    // last level); the remainder is the payload.
    let (id_len, rest) = match data.split_first() {
        Some((n, rest)) => ((*n % 48) as usize, rest),
        None => (0, data),
    };
    let (id, payload) = rest.split_at(id_len.min(rest.len()));
    let id = String::from_utf8_lossy(id);
    let Ok(job) = parse_job("node1", &id, payload) else {
        return;
    };
    validate_id("job id", &id).expect("accepted job id is valid");
    match &job {
        JobRequest::Migrate {
            container,
            target,
            options,
        } => {
            validate_id("container", container).expect("accepted container is valid");
            validate_id("target", target).expect("accepted target is valid");
            assert_ne!(target, "node1");
            assert!((1..=19).contains(&options.zstd_level));
        }
        JobRequest::Cancel { job: other } => {
            validate_id("job", other).expect("accepted cancel job is valid");
            assert_ne!(other.as_str(), &*id);
        }
    }
    let json = serde_json::to_vec(&job).expect("serialize");
    let again = parse_job("node1", &id, &json).expect("serialized job parses");
    assert_eq!(again, job);
});
