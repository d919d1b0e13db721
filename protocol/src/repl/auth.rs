//! Challenge-response authentication with a shared secret (HMAC-SHA256), as pure functions.
//!
//! Each side sends a fresh random nonce; each answers the peer's nonce with
//! HMAC-SHA256(secret, peer_nonce ‖ own_node_name). Binding the responder's name means a
//! response cannot be replayed as the other node's, and refusing a challenge equal to one's
//! own nonce stops an attacker from bouncing a node's challenge back to it. This authenticates
//! the peer when a channel opens; it does not protect the traffic that follows.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of an AuthChallenge nonce. The caller draws it from the OS random generator.
pub const NONCE_LEN: usize = 32;
/// Bytes of an AuthResponse MAC.
pub const MAC_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

fn keyed(secret: &[u8], nonce: &[u8; NONCE_LEN], node_name: &str) -> HmacSha256 {
    // HMAC accepts keys of every length (longer ones are hashed), so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(nonce);
    mac.update(node_name.as_bytes());
    mac
}

/// The AuthResponse a node named `own_node_name` sends for the peer's challenge `peer_nonce`.
pub fn auth_response(secret: &[u8], peer_nonce: &[u8; NONCE_LEN], own_node_name: &str) -> [u8; MAC_LEN] {
    keyed(secret, peer_nonce, own_node_name).finalize().into_bytes().into()
}

/// Whether `response` answers our challenge `own_nonce` for a peer that introduced itself (in
/// Hello) as `peer_node_name`. Compares in constant time, so timing reveals nothing about the
/// expected MAC.
pub fn verify_response(
    secret: &[u8],
    own_nonce: &[u8; NONCE_LEN],
    peer_node_name: &str,
    response: &[u8; MAC_LEN],
) -> bool {
    keyed(secret, own_nonce, peer_node_name).verify_slice(response).is_ok()
}

/// True if the peer's challenge is our own nonce: someone is reflecting our challenge to make
/// us compute the answer for them. The node then refuses with AuthFailed.
pub fn is_reflected(own_nonce: &[u8; NONCE_LEN], peer_nonce: &[u8; NONCE_LEN]) -> bool {
    own_nonce == peer_nonce
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
        let mut m = HmacSha256::new_from_slice(key).unwrap();
        m.update(data);
        m.finalize().into_bytes().to_vec()
    }

    /// RFC 4231 test cases 1, 2 and 6 (a key longer than the block size): the primitive.
    #[test]
    fn hmac_sha256_rfc4231() {
        let expected = hex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
        assert_eq!(hmac(&[0x0b; 20], b"Hi There"), expected);
        let expected = hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert_eq!(hmac(b"Jefe", b"what do ya want for nothing?"), expected);
        let expected = hex("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
        assert_eq!(hmac(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First"), expected);
    }

    /// Ours: the MAC covers the nonce followed by the responder's name, nothing else.
    #[test]
    fn response_is_hmac_of_nonce_and_own_name() {
        let nonce: [u8; 32] = std::array::from_fn(|i| i as u8);
        let mut data = nonce.to_vec();
        data.extend_from_slice(b"alpha");
        let r = auth_response(b"s3cret", &nonce, "alpha");
        assert_eq!(r.to_vec(), hmac(b"s3cret", &data));
        // Computed independently (Python hmac), so a change of construction shows up here.
        assert_eq!(r.to_vec(), hex("d12969e2708bd890b9dfd09520b7a51dbe0b6d4f63e2f6f4ebdc9706e35b345b"));
        assert!(verify_response(b"s3cret", &nonce, "alpha", &r));
    }

    #[test]
    fn wrong_secret_name_or_nonce_fails() {
        let nonce = [7u8; 32];
        let r = auth_response(b"right", &nonce, "beta");
        assert!(verify_response(b"right", &nonce, "beta", &r));
        assert!(!verify_response(b"wrong", &nonce, "beta", &r), "wrong secret");
        assert!(!verify_response(b"", &nonce, "beta", &r), "no secret");
        assert!(!verify_response(b"right", &nonce, "alpha", &r), "answer bound to the responder's name");
        assert!(!verify_response(b"right", &[8u8; 32], "beta", &r), "answer bound to the nonce");
        let mut flipped = r;
        flipped[31] ^= 1;
        assert!(!verify_response(b"right", &nonce, "beta", &flipped));
    }

    #[test]
    fn reflected_nonce_is_detected() {
        let own = [0x5a; 32];
        assert!(is_reflected(&own, &own));
        let mut other = own;
        other[0] ^= 0x80;
        assert!(!is_reflected(&own, &other));
    }

    proptest! {
        #[test]
        fn responses_verify(secret in proptest::collection::vec(any::<u8>(), 0..100),
                            nonce: [u8; 32], name in "\\PC{0,20}") {
            let r = auth_response(&secret, &nonce, &name);
            prop_assert!(verify_response(&secret, &nonce, &name, &r));
            // Appending a zero byte would give the same HMAC key (keys are zero-padded to the
            // block size), so the changed secret ends in a non-zero byte.
            let mut other = secret.clone();
            other.push(b'x');
            prop_assert!(!verify_response(&other, &nonce, &name, &r));
        }
    }
}
