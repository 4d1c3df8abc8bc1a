//! Termination's verification: compare source and target chunk by chunk,
//! each chunk under its range locks so a mirrored-back write cannot land
//! between the two reads. Chunks that are holes on both sides are equal
//! without reading.

use rand::Rng;

use crate::error::Result;
use crate::interposer::Link;
use volmig_master::Verify;

const VERIFY_CHUNK: u64 = 4 << 20;
const SAMPLE_MIN: u64 = 64;

/// Returns the first offset where source and target differ, if any.
pub fn verify_blocking(link: &Link, mode: Verify) -> Result<Option<u64>> {
    let size = link.source.size();
    let chunks = size.div_ceil(VERIFY_CHUNK);
    let picked: Vec<u64> = match mode {
        Verify::None => return Ok(None),
        Verify::Full => (0..chunks).collect(),
        Verify::Sample => {
            let n = (chunks / 100).max(SAMPLE_MIN).min(chunks);
            let mut rng = rand::rng();
            let mut v: Vec<u64> = (0..n).map(|_| rng.random_range(0..chunks)).collect();
            v.sort_unstable();
            v.dedup();
            v
        }
    };
    let mut a = vec![0u8; VERIFY_CHUNK as usize];
    let mut b = vec![0u8; VERIFY_CHUNK as usize];
    for c in picked {
        let off = c * VERIFY_CHUNK;
        let len = VERIFY_CHUNK.min(size - off);
        let _locked = link.locks.lock(off, len);
        let both_holes = link.source.segments(off, len)?.iter().all(|s| s.hole)
            && link.target.segments(off, len)?.iter().all(|s| s.hole);
        if both_holes {
            continue;
        }
        let (a, b) = (&mut a[..len as usize], &mut b[..len as usize]);
        link.source.read_at(a, off)?;
        link.target.read_at(b, off)?;
        if a != b {
            let i = a
                .iter()
                .zip(b.iter())
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Ok(Some(off + i as u64));
        }
    }
    Ok(None)
}
