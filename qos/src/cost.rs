//! Normalization: what an I/O costs in normalized units.

use crate::Error;
use vstor_core::{Op, Request};

/// The default normalization unit: 8 KiB, as Hyper-V's Storage QoS counts.
pub const DEFAULT_UNIT: u64 = 8192;

/// What one request costs: normalized units (what IOPS limits count) and data bytes (what
/// bandwidth caps count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    /// Normalized units (0 only for a flush, which is not scheduled).
    pub units: u64,
    /// Bytes of data moved (0 for flush, discard and write-zeroes).
    pub bytes: u64,
}

/// How requests are counted.
///
/// - A read or a write of `n` bytes costs `ceil(n / unit)` units, at least 1: with the default
///   8 KiB unit, 512 B, 4 KiB and 8 KiB cost 1, 12 KiB costs 2, 20 KiB costs 3 and 1 MiB costs
///   128.
/// - A flush costs nothing and is never held back (it keeps its place as a barrier).
/// - A discard or a write-zeroes costs [`other_units`](Normalization::other_units) units
///   (1 by default) whatever its length, and no bandwidth: it moves no data, and a long
///   discard is one command to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Normalization {
    unit: u64,
    other_units: u64,
}

impl Default for Normalization {
    fn default() -> Self {
        Normalization {
            unit: DEFAULT_UNIT,
            other_units: 1,
        }
    }
}

impl Normalization {
    /// A normalization with the given unit in bytes (512 and up) and the default cost of 1
    /// unit for discard and write-zeroes.
    pub fn new(unit: u64) -> Result<Self, Error> {
        if unit < 512 {
            return Err(Error::InvalidConfig(format!(
                "normalization unit {unit} bytes is below the 512-byte minimum"
            )));
        }
        Ok(Normalization {
            unit,
            other_units: 1,
        })
    }

    /// The same normalization with discard and write-zeroes costing `units` each (at least 1).
    pub fn with_other_units(mut self, units: u64) -> Self {
        self.other_units = units.max(1);
        self
    }

    /// The unit in bytes.
    pub fn unit(&self) -> u64 {
        self.unit
    }

    /// What a discard or a write-zeroes costs.
    pub fn other_units(&self) -> u64 {
        self.other_units
    }

    /// Units for a data transfer of `bytes` bytes: `ceil(bytes / unit)`, at least 1.
    pub fn units(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.unit).max(1)
    }

    /// What `req` costs.
    pub fn cost(&self, req: &Request<'_>) -> Cost {
        match &req.op {
            Op::Read { .. } | Op::Write { .. } => {
                let bytes = req.len();
                Cost {
                    units: self.units(bytes),
                    bytes,
                }
            }
            Op::Discard { .. } | Op::WriteZeroes { .. } => Cost {
                units: self.other_units,
                bytes: 0,
            },
            Op::Flush => Cost::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_normalization_table() {
        let n = Normalization::default();
        for (bytes, units) in [
            (512u64, 1u64),
            (4096, 1),
            (8192, 1),
            (8193, 2),
            (12 << 10, 2),
            (16 << 10, 2),
            (20 << 10, 3),
            (64 << 10, 8),
            (1 << 20, 128),
            (0, 1),
        ] {
            assert_eq!(n.units(bytes), units, "{bytes} bytes");
        }
    }

    #[test]
    fn configurable_unit() {
        let n = Normalization::new(4096).unwrap();
        assert_eq!(n.units(4096), 1);
        assert_eq!(n.units(8192), 2);
        assert_eq!(n.units(1 << 20), 256);
        let n = Normalization::new(512).unwrap();
        assert_eq!(n.units(4096), 8);
        assert!(Normalization::new(0).is_err());
        assert!(Normalization::new(511).is_err());
    }

    #[test]
    fn request_costs() {
        let n = Normalization::default();
        let mut buf = vec![0u8; 20 << 10];
        assert_eq!(
            n.cost(&Request::read(0, &mut buf)),
            Cost {
                units: 3,
                bytes: 20 << 10
            }
        );
        let a = vec![0u8; 4096];
        let b = vec![0u8; 8192];
        assert_eq!(
            n.cost(&Request::writev(0, [&a[..], &b[..]])),
            Cost {
                units: 2,
                bytes: 12 << 10
            }
        );
        assert_eq!(n.cost(&Request::flush()), Cost::default());
        assert_eq!(
            n.cost(&Request::discard(0, 1 << 30)),
            Cost { units: 1, bytes: 0 }
        );
        let n = n.with_other_units(4);
        assert_eq!(
            n.cost(&Request::write_zeroes(0, 4096)),
            Cost { units: 4, bytes: 0 }
        );
    }
}
