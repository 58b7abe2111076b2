//! FNV-1a (64-bit), the one hash behind seeds and file metadata. Unlike `DefaultHasher` its
//! values never change between Rust versions or platforms, so a run, a data set or a saved
//! file that depends on one stays reproducible.

/// FNV-1a's standard offset basis: `fnv1a_seeded(bytes, OFFSET_BASIS) == fnv1a(bytes)`.
pub const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0100_0000_01b3;

/// FNV-1a of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_seeded(bytes, OFFSET_BASIS)
}

/// FNV-1a of `bytes` starting from `basis` instead of the standard offset basis, for a hash
/// family that must not collide with plain [`fnv1a`] values.
pub fn fnv1a_seeded(bytes: &[u8], basis: u64) -> u64 {
    bytes.iter().fold(basis, |h, &b| (h ^ b as u64).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published FNV-1a 64 test vectors, and values that existing seeds depend on.
    #[test]
    fn values_are_fnv1a_64() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a(b"noise"), 0x6c09_2771_d207_68d1);
        assert_eq!(fnv1a_seeded(b"foobar", OFFSET_BASIS), fnv1a(b"foobar"));
        assert_eq!(fnv1a_seeded(b"", 0x8422_2325_cbf2_9ce4), 0x8422_2325_cbf2_9ce4);
        assert_eq!(fnv1a_seeded(b"blocks.0.attn2.to_k", 0x8422_2325_cbf2_9ce4), 0xf132_2dcf_9c42_e6f6);
    }
}
