//! Parity codes: XOR for one parity, and P + Q over GF(2^8) (polynomial 0x11d, generator 2,
//! as Linux md's RAID-6) for two.
//!
//! Shards are numbered data first (`0..k`), then parities (`k..k + m`). Parity `P` is the XOR of
//! the data shards; parity `Q` is `sum(g^i * D_i)`. Any `m` missing shards are rebuilt by
//! inverting the rows of the generator matrix that belong to present shards.

/// exp and log tables of GF(2^8) with polynomial x^8 + x^4 + x^3 + x^2 + 1.
const fn tables() -> ([u8; 512], [u8; 256]) {
    let mut exp = [0u8; 512];
    let mut log = [0u8; 256];
    let mut x: u16 = 1;
    let mut i = 0;
    while i < 255 {
        exp[i] = x as u8;
        log[x as usize] = i as u8;
        x <<= 1;
        if x & 0x100 != 0 {
            x ^= 0x11d;
        }
        i += 1;
    }
    while i < 512 {
        exp[i] = exp[i - 255];
        i += 1;
    }
    (exp, log)
}

const TABLES: ([u8; 512], [u8; 256]) = tables();
const EXP: [u8; 512] = TABLES.0;
const LOG: [u8; 256] = TABLES.1;

/// Multiplies in GF(2^8).
pub fn gf_mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        0
    } else {
        EXP[usize::from(LOG[usize::from(a)]) + usize::from(LOG[usize::from(b)])]
    }
}

/// The multiplicative inverse in GF(2^8) (`a` non-zero).
fn gf_inv(a: u8) -> u8 {
    debug_assert!(a != 0);
    EXP[255 - usize::from(LOG[usize::from(a)])]
}

/// `dst ^= src`.
pub fn xor_into(dst: &mut [u8], src: &[u8]) {
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (a, b) in (&mut d).zip(&mut s) {
        let v = u64::from_ne_bytes(a.try_into().expect("8 bytes"))
            ^ u64::from_ne_bytes(b.try_into().expect("8 bytes"));
        a.copy_from_slice(&v.to_ne_bytes());
    }
    for (a, b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a ^= *b;
    }
}

/// `dst ^= c * src` in GF(2^8).
pub fn mul_add_into(dst: &mut [u8], src: &[u8], c: u8) {
    match c {
        0 => {}
        1 => xor_into(dst, src),
        _ => {
            let mut table = [0u8; 256];
            for (x, t) in table.iter_mut().enumerate() {
                *t = gf_mul(c, x as u8);
            }
            for (a, b) in dst.iter_mut().zip(src) {
                *a ^= table[usize::from(*b)];
            }
        }
    }
}

/// The coefficient of data shard `i` in parity `j`.
fn coef(j: usize, i: usize) -> u8 {
    match j {
        0 => 1,
        _ => EXP[i % 255],
    }
}

/// Computes the `parity.len()` (1 or 2) parity shards of the data shards.
///
/// Two parities are computed in one pass as Linux md's RAID-6 does: `P` by XOR and `Q` by
/// Horner's rule, `Q = ((D[k-1] * g + D[k-2]) * g + ...) * g + D[0]`, where multiplying a
/// whole word of bytes by `g = 2` is a shift and a masked XOR (no table lookups), so the loop
/// runs on 64-bit lanes that the compiler vectorizes.
pub fn encode(data: &[&[u8]], parity: &mut [&mut [u8]]) {
    if let [p, q] = parity {
        if !data.is_empty() && data.len() < 255 {
            encode_pq(data, p, q);
            return;
        }
    }
    if let [p] = parity {
        if !data.is_empty() {
            encode_p(data, p);
            return;
        }
    }
    for (j, p) in parity.iter_mut().enumerate() {
        p.fill(0);
        for (i, d) in data.iter().enumerate() {
            mul_add_into(p, d, coef(j, i));
        }
    }
}

/// Multiplies each of the 8 bytes of `x` by 2 in GF(2^8) (polynomial 0x11d).
#[inline(always)]
fn mul2_lanes(x: u64) -> u64 {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let carry = (x & HIGH) >> 7; // 0x01 in every byte whose top bit was set
                                 // carry * 0x1d, spelled as shifts: 0x1d = 0b1_1101, and no byte overflows into the next.
    ((x << 1) & !0x0101_0101_0101_0101) ^ carry ^ (carry << 2) ^ (carry << 3) ^ (carry << 4)
}

/// Bytes per step of the P+Q loop: 8 words, which the compiler keeps in vector registers.
const LANES: usize = 8;
const STEP: usize = LANES * 8;

fn load(b: &[u8]) -> [u64; LANES] {
    let mut w = [0u64; LANES];
    for (w, c) in w.iter_mut().zip(b.chunks_exact(8)) {
        *w = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
    }
    w
}

fn store(w: &[u64; LANES], b: &mut [u8]) {
    for (w, c) in w.iter().zip(b.chunks_exact_mut(8)) {
        c.copy_from_slice(&w.to_ne_bytes());
    }
}

/// `P = sum D_i` (XOR) for shards of equal length, in one pass: each word of `P` is written
/// once from the data words (no clearing, no read-modify-write of `P` per shard).
fn encode_p(data: &[&[u8]], p: &mut [u8]) {
    let len = p.len();
    let whole = len - len % STEP;
    let (first, rest) = data.split_first().expect("one or more data shards");
    for at in (0..whole).step_by(STEP) {
        let mut pw = load(&first[at..at + STEP]);
        for d in rest {
            let dw = load(&d[at..at + STEP]);
            for i in 0..LANES {
                pw[i] ^= dw[i];
            }
        }
        store(&pw, &mut p[at..at + STEP]);
    }
    // The tail, byte by byte.
    for at in whole..len {
        p[at] = rest.iter().fold(first[at], |x, d| x ^ d[at]);
    }
}

/// `P = sum D_i`, `Q = sum 2^i D_i` for `k = data.len()` (1..255) shards of equal length.
fn encode_pq(data: &[&[u8]], p: &mut [u8], q: &mut [u8]) {
    let len = p.len();
    let whole = len - len % STEP;
    let last = data.len() - 1;
    for at in (0..whole).step_by(STEP) {
        let mut pw = load(&data[last][at..at + STEP]);
        let mut qw = pw;
        for d in data[..last].iter().rev() {
            let dw = load(&d[at..at + STEP]);
            for i in 0..LANES {
                pw[i] ^= dw[i];
                qw[i] = mul2_lanes(qw[i]) ^ dw[i];
            }
        }
        store(&pw, &mut p[at..at + STEP]);
        store(&qw, &mut q[at..at + STEP]);
    }
    // The tail, byte by byte.
    for at in whole..len {
        let mut pb = data[last][at];
        let mut qb = pb;
        for d in data[..last].iter().rev() {
            pb ^= d[at];
            qb = gf_mul(qb, 2) ^ d[at];
        }
        p[at] = pb;
        q[at] = qb;
    }
}

/// Rebuilds the missing shards (`None`) of `k` data and `shards.len() - k` parity shards, all of
/// `len` bytes. Returns false if more shards are missing than there are parities.
pub fn reconstruct(shards: &mut [Option<Vec<u8>>], k: usize, len: usize) -> bool {
    let m = shards.len() - k;
    let missing: Vec<usize> = (0..shards.len()).filter(|&i| shards[i].is_none()).collect();
    if missing.len() > m {
        return false;
    }
    let missing_data: Vec<usize> = missing.iter().copied().filter(|&i| i < k).collect();
    if let (&[x, y], 2) = (&missing_data[..], m) {
        if k < 255 {
            recover_two_data(shards, k, len, x, y);
            return true;
        }
    }
    if !missing_data.is_empty() {
        // Pick k present shards, data first; their generator rows form an invertible matrix.
        let rows: Vec<usize> = (0..shards.len())
            .filter(|&i| shards[i].is_some())
            .take(k)
            .collect();
        let mut a: Vec<Vec<u8>> = rows
            .iter()
            .map(|&r| {
                (0..k)
                    .map(|c| {
                        if r < k {
                            u8::from(r == c)
                        } else {
                            coef(r - k, c)
                        }
                    })
                    .collect()
            })
            .collect();
        let Some(inv) = invert(&mut a) else {
            return false;
        };
        for &d in &missing_data {
            let mut out = vec![0u8; len];
            for (j, &r) in rows.iter().enumerate() {
                let src = shards[r].as_deref().expect("present");
                mul_add_into(&mut out, src, inv[d][j]);
            }
            shards[d] = Some(out);
        }
    }
    let missing_parity: Vec<usize> = missing.into_iter().filter(|&i| i >= k).collect();
    for p in missing_parity {
        let mut out = vec![0u8; len];
        for (i, s) in shards[..k].iter().enumerate() {
            mul_add_into(&mut out, s.as_deref().expect("data"), coef(p - k, i));
        }
        shards[p] = Some(out);
    }
    true
}

/// Rebuilds data shards `x < y` from the rest and both parities, as Linux md's RAID-6 recovery:
/// the syndromes of the surviving data (one fast P+Q pass with the lost shards as zeros) give
/// `Pd = Dx + Dy` and `Qd = g^x Dx + g^y Dy`, so `Dx = (Qd + g^y Pd) / (g^x + g^y)` and
/// `Dy = Pd + Dx`: two table passes instead of one per surviving shard and lost shard.
fn recover_two_data(shards: &mut [Option<Vec<u8>>], k: usize, len: usize, x: usize, y: usize) {
    let zero = vec![0u8; len];
    let (mut pd, mut qd) = (vec![0u8; len], vec![0u8; len]);
    {
        let data: Vec<&[u8]> = shards[..k]
            .iter()
            .map(|s| s.as_deref().unwrap_or(&zero))
            .collect();
        encode_pq(&data, &mut pd, &mut qd);
    }
    xor_into(&mut pd, shards[k].as_deref().expect("P present"));
    xor_into(&mut qd, shards[k + 1].as_deref().expect("Q present"));
    let (gx, gy) = (coef(1, x), coef(1, y));
    let b = gf_inv(gx ^ gy);
    let a = gf_mul(b, gy);
    let mut dx = vec![0u8; len];
    mul_add_into(&mut dx, &pd, a);
    mul_add_into(&mut dx, &qd, b);
    xor_into(&mut pd, &dx); // now Dy
    shards[x] = Some(dx);
    shards[y] = Some(pd);
}

/// Gauss-Jordan inversion over GF(2^8); `None` if singular.
fn invert(a: &mut [Vec<u8>]) -> Option<Vec<Vec<u8>>> {
    let n = a.len();
    let mut inv: Vec<Vec<u8>> = (0..n)
        .map(|r| (0..n).map(|c| u8::from(r == c)).collect())
        .collect();
    for col in 0..n {
        let pivot = (col..n).find(|&r| a[r][col] != 0)?;
        a.swap(col, pivot);
        inv.swap(col, pivot);
        let f = gf_inv(a[col][col]);
        for c in 0..n {
            a[col][c] = gf_mul(a[col][c], f);
            inv[col][c] = gf_mul(inv[col][c], f);
        }
        for r in 0..n {
            if r != col && a[r][col] != 0 {
                let g = a[r][col];
                for c in 0..n {
                    let (x, y) = (gf_mul(g, a[col][c]), gf_mul(g, inv[col][c]));
                    a[r][c] ^= x;
                    inv[r][c] ^= y;
                }
            }
        }
    }
    Some(inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_p_and_pq_match_the_definition() {
        for k in [1usize, 2, 3, 5, 8, 17] {
            for len in [0usize, 1, 63, 64, 65, 200, 4096 + 7] {
                let data: Vec<Vec<u8>> = (0..k)
                    .map(|i| (0..len).map(|b| (b * 131 + i * 17 + 3) as u8).collect())
                    .collect();
                let d: Vec<&[u8]> = data.iter().map(|v| &v[..]).collect();
                let (mut p, mut q) = (vec![0xaau8; len], vec![0x55u8; len]);
                encode(&d, &mut [&mut p[..], &mut q[..]]);
                // Single parity: P alone, over a buffer holding other bytes.
                let mut p1 = vec![0x5au8; len];
                encode(&d, &mut [&mut p1[..]]);
                for b in 0..len {
                    let xor = data.iter().fold(0u8, |a, s| a ^ s[b]);
                    let sum = (0..k).fold(0u8, |a, i| a ^ gf_mul(coef(1, i), data[i][b]));
                    assert_eq!((p[b], q[b]), (xor, sum), "k={k} len={len} byte {b}");
                    assert_eq!(p1[b], xor, "single parity, k={k} len={len} byte {b}");
                }
            }
        }
        for x in 0..=255u8 {
            let w = u64::from_ne_bytes([x, 0x80, 0x7f, 1, 0, 0xff, x ^ 0x80, 2]);
            let got = mul2_lanes(w).to_ne_bytes();
            let want = w.to_ne_bytes().map(|b| gf_mul(b, 2));
            assert_eq!(got, want);
        }
    }

    #[test]
    fn field_laws() {
        for a in 1..=255u8 {
            assert_eq!(gf_mul(a, gf_inv(a)), 1);
            assert_eq!(gf_mul(a, 1), a);
        }
        assert_eq!(gf_mul(2, 0x80), 0x1d);
    }

    #[test]
    fn every_pair_of_missing_shards_is_rebuilt() {
        for k in 1..=8usize {
            for m in 1..=2usize {
                let len = 67;
                let data: Vec<Vec<u8>> = (0..k)
                    .map(|i| (0..len).map(|b| (b * 31 + i * 7 + 1) as u8).collect())
                    .collect();
                let mut parity = vec![vec![0u8; len]; m];
                {
                    let d: Vec<&[u8]> = data.iter().map(|v| &v[..]).collect();
                    let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| &mut v[..]).collect();
                    encode(&d, &mut p);
                }
                let all: Vec<Vec<u8>> = data.iter().chain(&parity).cloned().collect();
                let n = k + m;
                for x in 0..n {
                    for y in x..n {
                        if m == 1 && y != x {
                            continue;
                        }
                        let mut shards: Vec<Option<Vec<u8>>> =
                            all.iter().cloned().map(Some).collect();
                        shards[x] = None;
                        shards[y] = None;
                        assert!(reconstruct(&mut shards, k, len), "k={k} m={m} {x} {y}");
                        for (i, s) in shards.iter().enumerate() {
                            assert_eq!(s.as_ref().unwrap(), &all[i], "k={k} m={m} lost {x},{y}");
                        }
                    }
                }
                let mut too_many: Vec<Option<Vec<u8>>> = all.iter().cloned().map(Some).collect();
                for s in too_many.iter_mut().take(m + 1) {
                    *s = None;
                }
                assert!(!reconstruct(&mut too_many, k, len));
            }
        }
    }
}
