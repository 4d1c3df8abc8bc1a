//! Deterministic block contents for the demo's writer: block `b` at
//! generation `g` always holds the same bytes, so the whole expected image
//! is one u32 per block.

pub const BLOCK: usize = 4096;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` (one block) with the contents of block `b`, generation `g`.
pub fn fill(buf: &mut [u8], b: u64, g: u32) {
    let seed = splitmix((b << 24) ^ g as u64);
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&splitmix(seed ^ i as u64).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_and_repeatable() {
        let (mut a, mut b, mut c) = ([0u8; BLOCK], [0u8; BLOCK], [0u8; BLOCK]);
        fill(&mut a, 1, 1);
        fill(&mut b, 1, 1);
        fill(&mut c, 1, 2);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().any(|&x| x != 0));
    }
}
