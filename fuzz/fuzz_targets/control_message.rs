//! `migration::protocol::recv`: the first bytes a peer sends on the data
//! port (after TLS), as either side reads them. A decoded message must
//! encode and decode to itself.
#![no_main]

use std::sync::OnceLock;

use ferry_agent::migration::protocol::{recv, send, ProtocolError, ToSource, ToTarget};
use ferry_agent::stream::StreamError;
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fn check<M>(data: &[u8])
where
    M: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    runtime().block_on(async {
        let mut input = data;
        let msg: M = match recv(&mut input).await {
            Ok(m) => m,
            // Short input is `Closed`; oversized or malformed JSON is a
            // protocol error. An I/O error cannot come from a byte slice.
            Err(ProtocolError::Closed | ProtocolError::Stream(StreamError::Protocol(_))) => return,
            Err(e) => panic!("unexpected error from a byte slice: {e}"),
        };
        let mut buf = Vec::new();
        send(&mut buf, &msg)
            .await
            .expect("encode a decoded message");
        let again: M = recv(&mut &buf[..]).await.expect("decode it again");
        assert_eq!(again, msg);
    })
}

fuzz_target!(|data: &[u8]| {
    check::<ToTarget>(data);
    check::<ToSource>(data);
});
