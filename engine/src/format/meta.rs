//! The log identity file `tally.meta` (docs/FORMAT.md, "Log identity file").
//!
//! Written once when a data directory is initialised; it names the log, and the log id
//! seeds the hash chain.

use super::record::Layout;
use super::{
    DecodeError, Timestamp, check_crc, check_format_version, check_magic, check_zero, le, need,
};

/// Magic of the identity file.
pub const META_MAGIC: &[u8; 8] = b"TALLYLOG";
/// Bytes in the identity file.
pub const META_LEN: usize = 64;
/// `format_version`.
pub const META_VERSION: usize = 8;
/// `meta_len`.
pub const META_LEN_FIELD: usize = 10;
/// 4 reserved bytes.
pub const META_RESERVED_A: usize = 12;
/// `log_id`.
pub const META_LOG_ID: usize = 16;
/// `created_time`.
pub const META_CREATED_TIME: usize = 32;
/// 20 reserved bytes.
pub const META_RESERVED_B: usize = 40;
/// `meta_crc`: CRC-32 of bytes `0..60`.
pub const META_CRC: usize = 60;
const _: () = assert!(META_CRC + 4 == META_LEN);

/// The identity of a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogMeta {
    /// 16 random bytes naming the log; also the chain seed's input.
    pub log_id: [u8; 16],
    /// When the log was created.
    pub created_time: Timestamp,
    /// The log's format version, as its record layout: every segment of the log has it.
    pub layout: Layout,
}

impl LogMeta {
    /// Encodes the file.
    #[must_use]
    pub fn encode(&self) -> [u8; META_LEN] {
        let mut b = [0u8; META_LEN];
        b[..8].copy_from_slice(META_MAGIC);
        le::put_u16(&mut b, META_VERSION, self.layout.version());
        le::put_u16(&mut b, META_LEN_FIELD, META_LEN as u16);
        b[META_LOG_ID..META_LOG_ID + 16].copy_from_slice(&self.log_id);
        le::put_u64(&mut b, META_CREATED_TIME, self.created_time.0);
        let crc = crc32fast::hash(&b[..META_CRC]);
        le::put_u32(&mut b, META_CRC, crc);
        b
    }

    /// Decodes and checks the file's bytes.
    ///
    /// # Errors
    /// [`DecodeError`] on a wrong length, magic, version or CRC, or non-zero reserved bytes.
    pub fn decode(b: &[u8]) -> Result<LogMeta, DecodeError> {
        need(b, META_LEN)?;
        if b.len() != META_LEN {
            return Err(DecodeError::LengthMismatch {
                what: "tally.meta",
                declared: META_LEN as u64,
                actual: b.len() as u64,
            });
        }
        check_magic(b, META_MAGIC, "TALLYLOG")?;
        check_crc(le::u32_at(b, META_CRC), &b[..META_CRC], "tally.meta")?;
        let layout = check_format_version(le::u16_at(b, META_VERSION), "tally.meta")?;
        if le::u16_at(b, META_LEN_FIELD) as usize != META_LEN {
            return Err(DecodeError::LengthMismatch {
                what: "tally.meta",
                declared: u64::from(le::u16_at(b, META_LEN_FIELD)),
                actual: META_LEN as u64,
            });
        }
        check_zero(b, META_RESERVED_A..META_RESERVED_A + 4, "tally.meta")?;
        check_zero(b, META_RESERVED_B..META_CRC, "tally.meta")?;
        Ok(LogMeta {
            log_id: le::array_at(b, META_LOG_ID),
            created_time: Timestamp(le::u64_at(b, META_CREATED_TIME)),
            layout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects() {
        let m = LogMeta {
            log_id: [9; 16],
            created_time: Timestamp(77),
            layout: Layout::V1,
        };
        let b = m.encode();
        assert_eq!(LogMeta::decode(&b), Ok(m));
        assert_eq!(&b[..8], b"TALLYLOG");
        let mut bad = b;
        bad[20] ^= 1;
        assert!(matches!(
            LogMeta::decode(&bad),
            Err(DecodeError::Checksum { .. })
        ));
        let mut bad = b;
        bad[META_RESERVED_B] = 1;
        let crc = crc32fast::hash(&bad[..META_CRC]);
        le::put_u32(&mut bad, META_CRC, crc);
        assert!(matches!(
            LogMeta::decode(&bad),
            Err(DecodeError::NonZeroReserved { .. })
        ));
        assert!(matches!(
            LogMeta::decode(&b[..63]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut long = b.to_vec();
        long.push(0);
        assert!(matches!(
            LogMeta::decode(&long),
            Err(DecodeError::LengthMismatch { .. })
        ));
    }
}
