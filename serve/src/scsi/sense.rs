//! Status codes, sense keys, additional sense codes, and fixed-format sense data.

/// GOOD.
pub const GOOD: u8 = 0x00;
/// CHECK CONDITION: the sense data says why.
pub const CHECK_CONDITION: u8 = 0x02;
/// BUSY.
pub const BUSY: u8 = 0x08;
/// RESERVATION CONFLICT.
pub const RESERVATION_CONFLICT: u8 = 0x18;
/// TASK ABORTED: the task was aborted by a PREEMPT AND ABORT of another I_T nexus while it
/// waited to run. The control mode page says TAS=0, so the transport sends no response for it.
pub const TASK_ABORTED: u8 = 0x40;

/// Sense keys.
pub mod key {
    /// NO SENSE.
    pub const NO_SENSE: u8 = 0x0;
    /// NOT READY.
    pub const NOT_READY: u8 = 0x2;
    /// MEDIUM ERROR.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// HARDWARE ERROR.
    pub const HARDWARE_ERROR: u8 = 0x4;
    /// ILLEGAL REQUEST.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// UNIT ATTENTION.
    pub const UNIT_ATTENTION: u8 = 0x6;
    /// DATA PROTECT.
    pub const DATA_PROTECT: u8 = 0x7;
    /// ABORTED COMMAND.
    pub const ABORTED_COMMAND: u8 = 0xb;
    /// MISCOMPARE.
    pub const MISCOMPARE: u8 = 0xe;
}

/// Additional sense code and qualifier pairs.
pub mod asc {
    /// NO ADDITIONAL SENSE INFORMATION.
    pub const NONE: (u8, u8) = (0x00, 0x00);
    /// LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE.
    pub const NOT_READY: (u8, u8) = (0x04, 0x00);
    /// WRITE ERROR.
    pub const WRITE_ERROR: (u8, u8) = (0x0c, 0x00);
    /// UNRECOVERED READ ERROR.
    pub const READ_ERROR: (u8, u8) = (0x11, 0x00);
    /// PARAMETER LIST LENGTH ERROR.
    pub const PARAMETER_LIST_LENGTH: (u8, u8) = (0x1a, 0x00);
    /// MISCOMPARE DURING VERIFY OPERATION.
    pub const MISCOMPARE_VERIFY: (u8, u8) = (0x1d, 0x00);
    /// INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: (u8, u8) = (0x20, 0x00);
    /// LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: (u8, u8) = (0x21, 0x00);
    /// INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: (u8, u8) = (0x24, 0x00);
    /// LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: (u8, u8) = (0x25, 0x00);
    /// INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAMETER_LIST: (u8, u8) = (0x26, 0x00);
    /// WRITE PROTECTED.
    pub const WRITE_PROTECTED: (u8, u8) = (0x27, 0x00);
    /// SPACE ALLOCATION FAILED WRITE PROTECT.
    pub const SPACE_ALLOCATION_FAILED: (u8, u8) = (0x27, 0x07);
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const POWER_ON_RESET: (u8, u8) = (0x29, 0x00);
    /// BUS DEVICE RESET FUNCTION OCCURRED (a logical unit reset).
    pub const BUS_DEVICE_RESET: (u8, u8) = (0x29, 0x03);
    /// RESERVATIONS PREEMPTED.
    pub const RESERVATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x03);
    /// RESERVATIONS RELEASED.
    pub const RESERVATIONS_RELEASED: (u8, u8) = (0x2a, 0x04);
    /// REGISTRATIONS PREEMPTED.
    pub const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x05);
    /// CAPACITY DATA HAS CHANGED.
    pub const CAPACITY_CHANGED: (u8, u8) = (0x2a, 0x09);
    /// SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: (u8, u8) = (0x39, 0x00);
    /// INTERNAL TARGET FAILURE.
    pub const INTERNAL_TARGET_FAILURE: (u8, u8) = (0x44, 0x00);
    /// INSUFFICIENT REGISTRATION RESOURCES.
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: (u8, u8) = (0x55, 0x04);
}

/// Length of the fixed-format sense data this target builds.
pub const SENSE_LEN: usize = 18;

/// Fixed-format sense data (current error) with `key` and `(asc, ascq)`.
pub fn fixed(key: u8, (asc, ascq): (u8, u8)) -> Vec<u8> {
    let mut s = vec![0u8; SENSE_LEN];
    s[0] = 0x70;
    s[2] = key & 0x0f;
    s[7] = (SENSE_LEN - 8) as u8;
    s[12] = asc;
    s[13] = ascq;
    s
}

/// Fixed-format sense data whose sense-key specific bytes point at the field in error: byte
/// `byte` (bit `bit`, when given) of the CDB (`in_cdb`) or of the parameter list.
pub fn with_field_pointer(
    key: u8,
    code: (u8, u8),
    in_cdb: bool,
    byte: u16,
    bit: Option<u8>,
) -> Vec<u8> {
    let mut s = fixed(key, code);
    let mut b = 0x80; // SKSV
    if in_cdb {
        b |= 0x40;
    }
    if let Some(bit) = bit {
        b |= 0x08 | (bit & 7);
    }
    s[15] = b;
    s[16..18].copy_from_slice(&byte.to_be_bytes());
    s
}

/// Fixed-format sense data with the INFORMATION field set (VALID bit on).
pub fn with_information(key: u8, code: (u8, u8), info: u32) -> Vec<u8> {
    let mut s = fixed(key, code);
    s[0] |= 0x80;
    s[3..7].copy_from_slice(&info.to_be_bytes());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let s = fixed(key::ILLEGAL_REQUEST, asc::INVALID_OPCODE);
        assert_eq!(s.len(), 18);
        assert_eq!((s[0], s[2], s[7], s[12], s[13]), (0x70, 5, 10, 0x20, 0));
        let s = with_field_pointer(
            key::ILLEGAL_REQUEST,
            asc::INVALID_FIELD_IN_CDB,
            true,
            1,
            Some(3),
        );
        assert_eq!((s[15], s[16], s[17]), (0x80 | 0x40 | 0x08 | 3, 0, 1));
        let s = with_information(key::MISCOMPARE, asc::MISCOMPARE_VERIFY, 513);
        assert_eq!((s[0], &s[3..7]), (0xf0, &[0u8, 0, 2, 1][..]));
    }
}
