//! Termination's verification: compare source and target chunk by chunk,
//! each chunk under its range locks so a mirrored-back write cannot land
//! between the two reads. Chunks that are holes on both sides are equal
//! without reading.
//!
//! A multi-attach volume's other agents mirror their writes back under
//! their own locks, which these do not exclude: a chunk read between one
//! of their target and source writes differs for a moment. A differing
//! chunk is therefore read again a few times before it counts; a real
//! difference stays.

use rand::Rng;

use crate::error::Result;
use crate::interposer::Link;
use volmig_api::Verify;

const VERIFY_CHUNK: u64 = 4 << 20;
const SAMPLE_MIN: u64 = 64;
/// Reads of a differing chunk before the difference counts.
const RECHECKS: u32 = 20;
const RECHECK_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

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
        let (a, b) = (&mut a[..len as usize], &mut b[..len as usize]);
        let mut attempt = 0;
        while let Some(i) = differs(link, off, a, b)? {
            attempt += 1;
            if attempt >= RECHECKS {
                return Ok(Some(off + i as u64));
            }
            std::thread::sleep(RECHECK_PAUSE);
        }
    }
    Ok(None)
}

/// Where the chunk at `off` first differs (reading into `a` and `b`).
fn differs(link: &Link, off: u64, a: &mut [u8], b: &mut [u8]) -> Result<Option<usize>> {
    let len = a.len() as u64;
    let _locked = link.locks.lock(off, len);
    let both_holes = link.source.segments(off, len)?.iter().all(|s| s.hole)
        && link.target.segments(off, len)?.iter().all(|s| s.hole);
    if both_holes {
        return Ok(None);
    }
    link.source.read_at(a, off)?;
    link.target.read_at(b, off)?;
    Ok((a != b).then(|| {
        a.iter()
            .zip(b.iter())
            .position(|(x, y)| x != y)
            .unwrap_or(0)
    }))
}
