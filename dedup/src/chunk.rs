//! Content-defined chunking (FastCDC 2020) and chunk ids (BLAKE3).

use std::io::Read;

/// A chunk id: the BLAKE3 hash of the chunk's bytes.
pub type ChunkId = [u8; 32];

/// The id of `data`.
pub fn chunk_id(data: &[u8]) -> ChunkId {
    *blake3::hash(data).as_bytes()
}

/// A chunk id in hex (for messages).
pub fn hex(id: &ChunkId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Chunking parameters: minimum, average and maximum chunk size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    /// Minimum chunk size.
    pub min: u32,
    /// Average (target) chunk size.
    pub avg: u32,
    /// Maximum chunk size.
    pub max: u32,
}

impl Default for ChunkParams {
    /// 32/64/128 KiB, as Windows Server's dedup uses.
    fn default() -> Self {
        ChunkParams {
            min: 32 << 10,
            avg: 64 << 10,
            max: 128 << 10,
        }
    }
}

impl ChunkParams {
    /// Checks the parameters against what FastCDC 2020 accepts.
    pub fn validate(&self) -> Result<(), String> {
        use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN};
        use fastcdc::v2020::{MINIMUM_MAX, MINIMUM_MIN};
        let (min, avg, max) = (self.min as usize, self.avg as usize, self.max as usize);
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
            && min <= avg
            && avg <= max
            && min % 2 == 0
            && avg % 2 == 0
            && max % 2 == 0;
        if !ok {
            return Err(format!(
                "chunk sizes {min}/{avg}/{max}: need even sizes with min <= avg <= max, min in \
                 {MINIMUM_MIN}..={MINIMUM_MAX}, avg in {AVERAGE_MIN}..={AVERAGE_MAX}, max in \
                 {MAXIMUM_MIN}..={MAXIMUM_MAX}"
            ));
        }
        Ok(())
    }
}

/// The bytes the chunker reads at a time.
const WINDOW: usize = 8 << 20;

/// Cuts what `src` yields into chunks and calls `f(offset, bytes)` for each, in order. The cut
/// points depend only on the content (FastCDC 2020, normalization level 1), so the same bytes
/// give the same chunks wherever they sit in a file.
pub fn chunk_stream<R: Read, E: From<std::io::Error>>(
    mut src: R,
    p: ChunkParams,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<u64, E> {
    let mut buf = vec![0u8; WINDOW.max(p.max as usize * 2)];
    let mut have = 0usize;
    let mut eof = false;
    let mut pos = 0u64;
    loop {
        while !eof && have < buf.len() {
            let n = src.read(&mut buf[have..])?;
            if n == 0 {
                eof = true;
            }
            have += n;
        }
        if have == 0 {
            return Ok(pos);
        }
        let mut used = 0usize;
        let cdc = fastcdc::v2020::FastCDC::new(
            &buf[..have],
            p.min as usize,
            p.avg as usize,
            p.max as usize,
        );
        for c in cdc {
            // Without the end of the input, the last cut of the window is not final.
            if !eof && c.offset + c.length == have {
                break;
            }
            f(pos, &buf[c.offset..c.offset + c.length])?;
            pos += c.length as u64;
            used = c.offset + c.length;
        }
        if eof && used == have {
            return Ok(pos);
        }
        buf.copy_within(used..have, 0);
        have -= used;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut r = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| r.u8(..)).collect()
    }

    #[test]
    fn chunks_cover_the_input_and_follow_content() {
        let p = ChunkParams::default();
        let d = data(3 << 20, 1);
        let mut chunks = Vec::new();
        let n = chunk_stream::<_, std::io::Error>(&d[..], p, |o, b| {
            chunks.push((o, b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(n, d.len() as u64);
        assert_eq!(chunks.concat_bytes(), d);
        for (_, c) in &chunks[..chunks.len() - 1] {
            assert!(c.len() >= p.min as usize && c.len() <= p.max as usize);
        }
        // The same content behind a prefix gives the same chunks after a few cuts.
        let mut shifted = data(1000, 2);
        shifted.extend_from_slice(&d);
        let mut ids2 = std::collections::HashSet::new();
        chunk_stream::<_, std::io::Error>(&shifted[..], p, |_, b| {
            ids2.insert(chunk_id(b));
            Ok(())
        })
        .unwrap();
        let common = chunks
            .iter()
            .filter(|(_, c)| ids2.contains(&chunk_id(c)))
            .count();
        assert!(common >= chunks.len() - 3, "{common} of {}", chunks.len());
    }

    #[test]
    fn small_windows_cut_like_one_buffer() {
        let p = ChunkParams {
            min: 256,
            avg: 1024,
            max: 4096,
        };
        let d = data(WINDOW * 2 + 12345, 3);
        let mut a = Vec::new();
        chunk_stream::<_, std::io::Error>(&d[..], p, |o, b| {
            a.push((o, b.len()));
            Ok(())
        })
        .unwrap();
        let b: Vec<(u64, usize)> = fastcdc::v2020::FastCDC::new(&d, 256, 1024, 4096)
            .map(|c| (c.offset as u64, c.length))
            .collect();
        assert_eq!(a, b);
    }

    trait Concat {
        fn concat_bytes(&self) -> Vec<u8>;
    }
    impl Concat for Vec<(u64, Vec<u8>)> {
        fn concat_bytes(&self) -> Vec<u8> {
            self.iter().flat_map(|(_, c)| c.iter().copied()).collect()
        }
    }
}
