//! `stream::archive::unpack_into`: any tar stream. Nothing may be created
//! outside the destination, nothing but files and folders inside it, and
//! the caps hold.
#![no_main]

mod sandbox;

use std::sync::OnceLock;

use ferry_agent::stream::archive::{unpack_into, UnpackLimits};
use libfuzzer_sys::fuzz_target;
use sandbox::Sandbox;

fn sandbox() -> &'static Sandbox {
    static S: OnceLock<Sandbox> = OnceLock::new();
    S.get_or_init(|| Sandbox::new("unpack"))
}

fuzz_target!(|data: &[u8]| {
    let sb = sandbox();
    sb.reset();
    let limits = UnpackLimits {
        max_entry_bytes: 1 << 20,
        max_total_bytes: 4 << 20,
        max_entries: 256,
    };
    let result = unpack_into(data, &sb.dest, &limits);
    sb.check();
    if let Ok(stats) = result {
        // Read to the end, and no more than the input.
        assert_eq!(stats.bytes_read, data.len() as u64);
        assert!(stats.file_bytes <= stats.bytes_read);
    }
});
