//! A partitioned read model for the projection crash tests: balances per account, each
//! padded so that a few thousand accounts make a state of hundreds of kilobytes, stored in
//! many parts.

use std::collections::BTreeMap;

use tally_engine::EventView;
use tally_engine::projection::{ChangedKeys, PartitionVisitor, Partitions, Projection};

/// Bytes of padding per account.
pub const PAD: usize = 200;

/// Balances per account stream (`acct-N`); `Book` events carry an `i64` amount.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Balance per account.
    pub balances: BTreeMap<String, i64>,
    changed: ChangedKeys,
}

fn value(balance: i64) -> Vec<u8> {
    let mut v = balance.to_le_bytes().to_vec();
    v.resize(8 + PAD, 0x5a);
    v
}

fn balance_of(v: &[u8]) -> Option<i64> {
    if v.len() != 8 + PAD {
        return None;
    }
    Some(i64::from_le_bytes(v[..8].try_into().ok()?))
}

impl Projection for Ledger {
    const STATE_VERSION: u32 = 1;

    fn initial() -> Ledger {
        Ledger::default()
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        let amount = i64::from_le_bytes(e.payload().try_into().map_err(|_| "an 8-byte amount")?);
        *self.balances.entry(e.stream().to_owned()).or_default() += amount;
        self.changed.mark(e.stream().as_bytes());
        Ok(())
    }

    fn encode_state(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in &self.balances {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&value(*v));
        }
        out
    }

    fn decode_state(mut bytes: &[u8]) -> Option<Ledger> {
        let mut l = Ledger::default();
        while !bytes.is_empty() {
            let n = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
            let k = std::str::from_utf8(bytes.get(4..4 + n)?).ok()?.to_owned();
            let v = balance_of(bytes.get(4 + n..4 + n + 8 + PAD)?)?;
            l.balances.insert(k, v);
            bytes = &bytes[4 + n + 8 + PAD..];
        }
        Some(l)
    }

    fn partitions(&self) -> Option<&dyn Partitions> {
        Some(self)
    }

    fn partitions_mut(&mut self) -> Option<&mut dyn Partitions> {
        Some(self)
    }
}

impl Partitions for Ledger {
    fn each_partition(&self, f: &mut PartitionVisitor<'_>) -> std::io::Result<()> {
        for (k, v) in &self.balances {
            f(k.as_bytes(), &value(*v))?;
        }
        Ok(())
    }

    fn encode_partition(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.balances
            .get(std::str::from_utf8(key).ok()?)
            .map(|v| value(*v))
    }

    fn load_partition(&mut self, key: &[u8], v: Option<&[u8]>) -> Result<(), String> {
        let k = String::from_utf8(key.to_vec()).map_err(|e| e.to_string())?;
        match v {
            Some(v) => {
                let b = balance_of(v).ok_or("a balance of the wrong size")?;
                self.balances.insert(k, b);
            }
            None => {
                self.balances.remove(&k);
            }
        }
        Ok(())
    }

    fn take_changed(&mut self) -> Vec<Vec<u8>> {
        self.changed.take()
    }
}
