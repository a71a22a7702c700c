//! Fuzzes the handoff message decoder with arbitrary bytes, both as they arrive (most
//! fail authentication) and re-signed with the key, so that the parser behind the
//! HMAC check is explored too. The decoder must never panic, and whatever it accepts
//! must encode back to the same message.

#![no_main]

use baton_layers::handoff::wire::{self, Key};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const SECRET: &[u8; 32] = b"fuzzing-key-fuzzing-key-fuzzing!";

fuzz_target!(|data: &[u8]| {
    let key = Key::new(SECRET).expect("a 32-byte key");
    let _ = wire::decode(&key, data, wire::now_ms());
    // The same bytes as a signed body behind the magic, at the clock they claim.
    let mut body = b"BTN1".to_vec();
    body.extend_from_slice(data);
    let now = data
        .get(17..25)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0);
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).expect("any key length");
    mac.update(&body);
    body.extend_from_slice(&mac.finalize().into_bytes());
    if let Ok(env) = wire::decode(&key, &body, now) {
        let again = wire::encode(&key, &env);
        let back = wire::decode(&key, &again[4..], now).expect("what was accepted re-encodes");
        assert_eq!(back, env);
    }
});
