//! Resiliency and the arithmetic of a space's layout: where a byte of a space lives.
//!
//! A space is a sequence of *extents*. An extent is a set of `width` slabs, one on each of
//! `width` distinct members, and holds `data_columns * slab_size` bytes of the space. Inside an
//! extent the space is striped in units of `interleave` bytes: row `r` holds data units
//! `r * data_columns ..` of the extent, unit `d` of the row at offset `r * interleave` of the
//! slab in the row's slot for data column `d`.
//!
//! - simple: `width = columns`, data column `d` in slot `d`;
//! - mirror with `k` copies: `width = columns * k`, copy `c` of data column `d` in slot
//!   `d * k + c`;
//! - parity with `m` parities: `width = columns`, `data_columns = columns - m`; the slots rotate
//!   by row: data column `d` of row `r` is in slot `(r + d) % width`, parity `j` in slot
//!   `(r + data_columns + j) % width`, so parity is spread over every member of the extent.

use crate::error::invalid;
use vstor_core::Result;

/// How a space keeps its data through the loss of members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resiliency {
    /// Striping only: the loss of any member holding one of its slabs loses the space.
    Simple,
    /// Two or three copies of every byte, each on a distinct member.
    Mirror {
        /// Copies (2 or 3).
        copies: u8,
    },
    /// Data columns plus one (XOR) or two (XOR and Reed-Solomon over GF(2^8)) parity columns,
    /// rotating over the members of each extent.
    Parity {
        /// Parity columns (1 or 2).
        redundancy: u8,
    },
}

impl Resiliency {
    /// How many members of an extent may be lost without losing data.
    pub fn tolerates(self) -> usize {
        match self {
            Resiliency::Simple => 0,
            Resiliency::Mirror { copies } => usize::from(copies) - 1,
            Resiliency::Parity { redundancy } => usize::from(redundancy),
        }
    }

    /// The name operators use: `simple`, `mirror` or `parity`.
    pub fn kind_name(self) -> &'static str {
        match self {
            Resiliency::Simple => "simple",
            Resiliency::Mirror { .. } => "mirror",
            Resiliency::Parity { .. } => "parity",
        }
    }

    /// The number the on-disk format stores beside the kind (copies or redundancy; 0 for simple).
    pub(crate) fn param(self) -> u8 {
        match self {
            Resiliency::Simple => 0,
            Resiliency::Mirror { copies } => copies,
            Resiliency::Parity { redundancy } => redundancy,
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Resiliency::Simple => 0,
            Resiliency::Mirror { .. } => 1,
            Resiliency::Parity { .. } => 2,
        }
    }

    pub(crate) fn from_code(code: u8, param: u8) -> Option<Self> {
        match (code, param) {
            (0, 0) => Some(Resiliency::Simple),
            (1, 2 | 3) => Some(Resiliency::Mirror { copies: param }),
            (2, 1 | 2) => Some(Resiliency::Parity { redundancy: param }),
            _ => None,
        }
    }
}

impl std::fmt::Display for Resiliency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resiliency::Simple => f.write_str("simple"),
            Resiliency::Mirror { copies } => write!(f, "{copies}-way mirror"),
            Resiliency::Parity { redundancy: 1 } => f.write_str("single parity"),
            Resiliency::Parity { .. } => f.write_str("dual parity"),
        }
    }
}

/// The most members one extent may span.
pub const MAX_WIDTH: usize = 32;
/// The smallest interleave.
pub const MIN_INTERLEAVE: u64 = 4096;

/// The geometry of a space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub resiliency: Resiliency,
    /// Columns as operators give them: simple and parity count every member of an extent,
    /// mirror counts data columns (members = columns * copies), as Storage Spaces does.
    pub columns: usize,
    pub data_columns: usize,
    pub width: usize,
    pub interleave: u64,
    pub slab_size: u64,
}

/// One piece of a request: a run of bytes inside one unit of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub extent: u64,
    pub row: u64,
    /// Data column.
    pub col: usize,
    /// Offset inside the unit.
    pub in_unit: u64,
    pub len: u64,
    /// Offset of the piece inside the request.
    pub at: u64,
}

impl Layout {
    /// Checks and builds a layout.
    pub fn new(
        resiliency: Resiliency,
        columns: usize,
        interleave: u64,
        slab_size: u64,
    ) -> Result<Self> {
        let (data_columns, width) = match resiliency {
            Resiliency::Simple => (columns, columns),
            Resiliency::Mirror { copies } => {
                if !(2..=3).contains(&copies) {
                    return Err(invalid(format!("a mirror has 2 or 3 copies, not {copies}")));
                }
                (columns, columns.saturating_mul(usize::from(copies)))
            }
            Resiliency::Parity { redundancy } => {
                if !(1..=2).contains(&redundancy) {
                    return Err(invalid(format!(
                        "parity has redundancy 1 or 2, not {redundancy}"
                    )));
                }
                let m = usize::from(redundancy);
                if columns < m + 2 {
                    return Err(invalid(format!(
                        "{resiliency} needs at least {} columns (data and parity), not {columns}",
                        m + 2
                    )));
                }
                (columns - m, columns)
            }
        };
        if columns == 0 {
            return Err(invalid("a space needs at least one column"));
        }
        if width > MAX_WIDTH {
            return Err(invalid(format!(
                "{resiliency} with {columns} columns spans {width} disks; at most {MAX_WIDTH}"
            )));
        }
        if interleave < MIN_INTERLEAVE
            || !interleave.is_power_of_two()
            || interleave > slab_size
            || slab_size % interleave != 0
        {
            return Err(invalid(format!(
                "interleave {interleave} must be a power of two of at least {MIN_INTERLEAVE} bytes that divides the slab size {slab_size}"
            )));
        }
        Ok(Layout {
            resiliency,
            columns,
            data_columns,
            width,
            interleave,
            slab_size,
        })
    }

    /// Bytes of the space one extent holds.
    pub fn extent_bytes(&self) -> u64 {
        self.data_columns as u64 * self.slab_size
    }

    /// Extents a space of `size` bytes needs.
    pub fn extents_for(&self, size: u64) -> u64 {
        size.div_ceil(self.extent_bytes())
    }

    /// Splits `[offset, offset + len)` of the space into pieces, in order.
    pub fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = Piece> + '_ {
        let mut pos = offset;
        let end = offset + len;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let eb = self.extent_bytes();
            let extent = pos / eb;
            let in_ext = pos % eb;
            let unit = in_ext / self.interleave;
            let in_unit = in_ext % self.interleave;
            let n = (self.interleave - in_unit).min(end - pos);
            let p = Piece {
                extent,
                row: unit / self.data_columns as u64,
                col: (unit % self.data_columns as u64) as usize,
                in_unit,
                len: n,
                at: pos - offset,
            };
            pos += n;
            Some(p)
        })
    }

    /// Byte offset inside a slab of `in_unit` in row `row`.
    pub fn slab_offset(&self, row: u64, in_unit: u64) -> u64 {
        row * self.interleave + in_unit
    }

    /// Copies per data column (1 unless mirrored).
    pub fn copies(&self) -> usize {
        match self.resiliency {
            Resiliency::Mirror { copies } => usize::from(copies),
            _ => 1,
        }
    }

    /// Parity columns (0 unless parity).
    pub fn parities(&self) -> usize {
        match self.resiliency {
            Resiliency::Parity { redundancy } => usize::from(redundancy),
            _ => 0,
        }
    }

    /// The slot of copy `copy` of data column `col` in row `row`.
    pub fn data_slot(&self, row: u64, col: usize, copy: usize) -> usize {
        match self.resiliency {
            Resiliency::Simple => col,
            Resiliency::Mirror { copies } => col * usize::from(copies) + copy,
            Resiliency::Parity { .. } => ((row % self.width as u64) as usize + col) % self.width,
        }
    }

    /// The slot of parity `j` in row `row` (parity layouts only).
    pub fn parity_slot(&self, row: u64, j: usize) -> usize {
        ((row % self.width as u64) as usize + self.data_columns + j) % self.width
    }

    /// Whether an extent whose slots are usable as `usable` says keeps all its data.
    pub fn extent_readable(&self, usable: impl Fn(usize) -> bool) -> bool {
        match self.resiliency {
            Resiliency::Simple => (0..self.width).all(usable),
            Resiliency::Mirror { copies } => {
                let k = usize::from(copies);
                (0..self.data_columns).all(|d| (0..k).any(|c| usable(d * k + c)))
            }
            Resiliency::Parity { redundancy } => {
                (0..self.width).filter(|&s| !usable(s)).count() <= usize::from(redundancy)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_in_order() {
        let l = Layout::new(Resiliency::Parity { redundancy: 1 }, 4, 4096, 65536).unwrap();
        assert_eq!(l.data_columns, 3);
        let ps: Vec<_> = l.pieces(4096 * 2 + 512, 3 * 65536).collect();
        let mut at = 0;
        for p in &ps {
            assert_eq!(p.at, at);
            at += p.len;
        }
        assert_eq!(at, 3 * 65536);
        assert_eq!(ps[0].col, 2);
        assert_eq!(ps[0].row, 0);
        assert_eq!(ps[0].in_unit, 512);
        assert_eq!(ps[1].row, 1);
        assert_eq!(ps[1].col, 0);
        // The third data unit of the last row of extent 0 is followed by extent 1.
        let last = l.pieces(l.extent_bytes() - 4096, 8192).collect::<Vec<_>>();
        assert_eq!((last[0].extent, last[0].row, last[0].col), (0, 15, 2));
        assert_eq!((last[1].extent, last[1].row, last[1].col), (1, 0, 0));
    }

    #[test]
    fn parity_rotates_and_slots_are_a_permutation() {
        let l = Layout::new(Resiliency::Parity { redundancy: 2 }, 5, 4096, 65536).unwrap();
        for row in 0..10u64 {
            let mut slots: Vec<usize> = (0..3).map(|d| l.data_slot(row, d, 0)).collect();
            slots.extend((0..2).map(|j| l.parity_slot(row, j)));
            slots.sort_unstable();
            assert_eq!(slots, vec![0, 1, 2, 3, 4]);
        }
        assert_ne!(l.parity_slot(0, 0), l.parity_slot(1, 0));
    }

    #[test]
    fn tolerance() {
        let m3 = Layout::new(Resiliency::Mirror { copies: 3 }, 2, 4096, 65536).unwrap();
        assert_eq!(m3.width, 6);
        assert!(m3.extent_readable(|s| s != 0 && s != 1));
        assert!(!m3.extent_readable(|s| s > 2));
        let p = Layout::new(Resiliency::Parity { redundancy: 1 }, 3, 4096, 65536).unwrap();
        assert!(p.extent_readable(|s| s != 1));
        assert!(!p.extent_readable(|s| s == 0));
        assert!(Layout::new(Resiliency::Parity { redundancy: 2 }, 3, 4096, 65536).is_err());
        assert!(Layout::new(Resiliency::Simple, 2, 3000, 65536).is_err());
        assert!(Layout::new(Resiliency::Mirror { copies: 4 }, 1, 4096, 65536).is_err());
    }
}
