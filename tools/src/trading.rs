//! The trading domain: a Trade aggregate (one stream per trade, `trade-<id>`), its
//! lifecycle events, market prices, and a positions and P&L projection. Quantities,
//! prices and money are exact decimals (`rust_decimal`), never floating point, so that a
//! replay gives the same numbers to the last digit.
//!
//! Events (JSON payloads, decimals as strings):
//! - `NEW` [`NewTrade`]: book, counterparty, instrument, side, quantity, price, trade and
//!   settlement dates;
//! - `AMEND` [`Amend`]: a new quantity, price and/or settlement date;
//! - `CANCEL` [`Cancel`]: the trade is void (its position disappears);
//! - `NOVATE` [`Novate`]: the trade moves to a new counterparty;
//! - `EXERCISE` [`Exercise`]: part of the open quantity is closed at the current mark;
//! - `SETTLE` [`Settle`]: the remaining open quantity is closed at the current mark;
//! - `PRICE` [`MarketPrice`], on `price-<instrument>`: the instrument's mark.
//!
//! P&L model ([`Positions`]): per book and instrument, open quantity `Q` (buys positive)
//! and cost `C` (the sum of open quantity times trade price). Unrealised P&L is
//! `Q x mark - C`. Exercising or settling closes quantity `x` of a trade at price `p` at
//! the mark `m` of that moment and realises `sign x (m - p)`. Without a mark, the trade's
//! own price is used (no P&L).

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tally_engine::EventView;
use tally_engine::aggregate::Aggregate;
use tally_engine::projection::{ChangedKeys, PartitionVisitor, Partitions, Projection};
use tally_engine::{EventData, EventId};

/// Buy or sell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Side {
    /// Buy: a positive quantity.
    Buy,
    /// Sell: a negative quantity.
    Sell,
}

impl Side {
    fn sign(self) -> Decimal {
        match self {
            Side::Buy => Decimal::ONE,
            Side::Sell => Decimal::NEGATIVE_ONE,
        }
    }
}

/// `NEW`: a trade is booked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTrade {
    /// The trade id (the stream is `trade-<id>`).
    pub trade_id: String,
    /// The book it belongs to.
    pub book: String,
    /// The counterparty.
    pub counterparty: String,
    /// The instrument.
    pub instrument: String,
    /// Buy or sell.
    pub side: Side,
    /// Quantity, positive.
    pub quantity: Decimal,
    /// Price per unit.
    pub price: Decimal,
    /// Trade date, `YYYY-MM-DD`.
    pub trade_date: String,
    /// Settlement date, `YYYY-MM-DD`.
    pub settlement_date: String,
}

/// `AMEND`: terms change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amend {
    /// A new quantity.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub quantity: Option<Decimal>,
    /// A new price.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub price: Option<Decimal>,
    /// A new settlement date.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub settlement_date: Option<String>,
}

/// `CANCEL`: the trade is void.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    /// Why.
    pub reason: String,
}

/// `NOVATE`: the trade moves to another counterparty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Novate {
    /// The new counterparty.
    pub new_counterparty: String,
}

/// `EXERCISE`: part of the open quantity is closed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exercise {
    /// Quantity exercised, positive.
    pub quantity: Decimal,
}

/// `SETTLE`: the trade settles.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settle {
    /// Settlement date, `YYYY-MM-DD`.
    pub settled_on: String,
}

/// `PRICE`: an instrument's mark.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketPrice {
    /// The instrument.
    pub instrument: String,
    /// The price.
    pub price: Decimal,
}

/// The stream of trade `id`.
#[must_use]
pub fn trade_stream(id: &str) -> String {
    format!("trade-{id}")
}

/// The stream of an instrument's prices.
#[must_use]
pub fn price_stream(instrument: &str) -> String {
    format!("price-{instrument}")
}

/// The largest quantity a trade may have: with [`PRICE_MAX`], products stay far inside an
/// exact decimal's range (28 digits), so P&L arithmetic cannot overflow.
pub const QUANTITY_MAX: Decimal = Decimal::from_parts(
    1_000_000_000_000u64 as u32,
    (1_000_000_000_000u64 >> 32) as u32,
    0,
    false,
    0,
);
/// The largest price.
pub const PRICE_MAX: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);

fn check_range(quantity: Decimal, price: Decimal) -> Result<(), String> {
    if quantity <= Decimal::ZERO || quantity > QUANTITY_MAX {
        return Err(format!("quantity {quantity} is not in (0, {QUANTITY_MAX}]"));
    }
    if price <= Decimal::ZERO || price > PRICE_MAX {
        return Err(format!("price {price} is not in (0, {PRICE_MAX}]"));
    }
    Ok(())
}

fn json<T: Serialize>(event_type: &str, body: &T) -> EventData {
    let text = serde_json::to_string(body).unwrap_or_else(|e| unreachable!("{e}"));
    EventData::json(event_type, text).aggregate_type("Trade")
}

/// The field of a `NEW` event that names the person at the counterparty who receives the
/// trade's confirmations.
pub const CONTACT_FIELD: &str = "confirmation_contact";

/// A person at the counterparty who receives a trade's confirmations: personal data
/// (GDPR), so `NEW` seals it under the person's own key ([`Trade::book_for`]) and a
/// `tally forget` of the person erases it from every trade at once. The positions and P&L
/// never read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// The person's name.
    pub name: String,
    /// Where confirmations go.
    pub email: String,
}

impl Contact {
    /// The data subject's id: what `tally forget` is given.
    #[must_use]
    pub fn subject(&self) -> String {
        format!("contact:{}", self.email)
    }
}

/// A `PRICE` event.
#[must_use]
pub fn price_event(instrument: &str, price: Decimal) -> EventData {
    EventData::json(
        "PRICE",
        serde_json::to_string(&MarketPrice {
            instrument: instrument.to_owned(),
            price,
        })
        .unwrap_or_else(|e| unreachable!("{e}")),
    )
    .aggregate_type("Instrument")
}

fn parse<'a, T: Deserialize<'a>>(e: &'a dyn EventView) -> Result<T, String> {
    serde_json::from_slice(e.payload())
        .map_err(|err| format!("{} payload does not parse: {err}", e.event_type()))
}

/// Where a trade is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Booked, open.
    Live,
    /// Void.
    Cancelled,
    /// Settled.
    Settled,
}

/// The Trade aggregate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trade {
    /// The terms as amended, `None` before `NEW`.
    pub terms: Option<NewTrade>,
    /// Status.
    pub status: Status,
    /// Quantity not yet exercised or settled.
    pub open_quantity: Decimal,
    /// Quantity exercised so far.
    #[serde(default)]
    pub exercised: Decimal,
    /// Events applied.
    pub events: u64,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TradeError {
    /// The trade does not exist yet.
    #[error("no such trade")]
    NotBooked,
    /// The trade is cancelled or settled.
    #[error("the trade is {0:?}")]
    NotLive(Status),
    /// A quantity or price out of range.
    #[error("{0}")]
    Invalid(String),
}

impl Trade {
    fn live(&self) -> Result<&NewTrade, TradeError> {
        let terms = self.terms.as_ref().ok_or(TradeError::NotBooked)?;
        if self.status != Status::Live {
            return Err(TradeError::NotLive(self.status));
        }
        Ok(terms)
    }

    /// `NEW` for a trade not yet booked, without a confirmation contact (the unit tests';
    /// the demo books with [`Trade::book_for`]).
    ///
    /// # Errors
    /// [`TradeError::Invalid`] for a quantity or price that is not positive.
    #[cfg(test)]
    pub fn book(terms: &NewTrade) -> Result<EventData, TradeError> {
        check_range(terms.quantity, terms.price).map_err(TradeError::Invalid)?;
        Ok(json("NEW", terms))
    }

    /// `NEW` for a trade not yet booked, with the counterparty's confirmation contact in
    /// [`CONTACT_FIELD`], sealed under the contact's key (the rest of the payload stays
    /// clear).
    ///
    /// # Errors
    /// [`TradeError::Invalid`] for a quantity or price that is not positive.
    pub fn book_for(terms: &NewTrade, contact: &Contact) -> Result<EventData, TradeError> {
        #[derive(Serialize)]
        struct Booked<'a> {
            #[serde(flatten)]
            terms: &'a NewTrade,
            confirmation_contact: &'a Contact,
        }
        check_range(terms.quantity, terms.price).map_err(TradeError::Invalid)?;
        Ok(json(
            "NEW",
            &Booked {
                terms,
                confirmation_contact: contact,
            },
        )
        .personal(tally_engine::Personal::fields(
            contact.subject(),
            [CONTACT_FIELD],
        )))
    }

    /// `AMEND`.
    ///
    /// # Errors
    /// The trade is not live, or the new terms are out of range.
    pub fn amend(&self, a: &Amend) -> Result<EventData, TradeError> {
        let t = self.live()?;
        check_range(a.quantity.unwrap_or(t.quantity), a.price.unwrap_or(t.price))
            .map_err(TradeError::Invalid)?;
        if a.quantity.is_some_and(|q| q < self.exercised) {
            return Err(TradeError::Invalid(format!(
                "a quantity below the {} already exercised",
                self.exercised
            )));
        }
        Ok(json("AMEND", a))
    }

    /// `CANCEL`.
    ///
    /// # Errors
    /// The trade is not live.
    pub fn cancel(&self, reason: &str) -> Result<EventData, TradeError> {
        self.live()?;
        Ok(json(
            "CANCEL",
            &Cancel {
                reason: reason.to_owned(),
            },
        ))
    }

    /// `NOVATE`.
    ///
    /// # Errors
    /// The trade is not live, or the counterparty does not change.
    pub fn novate(&self, new_counterparty: &str) -> Result<EventData, TradeError> {
        let t = self.live()?;
        if t.counterparty == new_counterparty {
            return Err(TradeError::Invalid(
                "novation to the same counterparty".into(),
            ));
        }
        Ok(json(
            "NOVATE",
            &Novate {
                new_counterparty: new_counterparty.to_owned(),
            },
        ))
    }

    /// `EXERCISE` of part of the open quantity.
    ///
    /// # Errors
    /// The trade is not live, or the quantity is not in `(0, open]`.
    pub fn exercise(&self, quantity: Decimal) -> Result<EventData, TradeError> {
        self.live()?;
        if quantity <= Decimal::ZERO || quantity > self.open_quantity {
            return Err(TradeError::Invalid(format!(
                "exercise of {quantity} with {} open",
                self.open_quantity
            )));
        }
        Ok(json("EXERCISE", &Exercise { quantity }))
    }

    /// `SETTLE`.
    ///
    /// # Errors
    /// The trade is not live.
    pub fn settle(&self, on: &str) -> Result<EventData, TradeError> {
        self.live()?;
        Ok(json(
            "SETTLE",
            &Settle {
                settled_on: on.to_owned(),
            },
        ))
    }
}

impl Aggregate for Trade {
    const SNAPSHOT_VERSION: u32 = 2;

    fn initial() -> Trade {
        Trade {
            terms: None,
            status: Status::Live,
            open_quantity: Decimal::ZERO,
            exercised: Decimal::ZERO,
            events: 0,
        }
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        match e.event_type() {
            "NEW" => {
                let t: NewTrade = parse(e)?;
                check_range(t.quantity, t.price)?;
                self.open_quantity = t.quantity;
                self.exercised = Decimal::ZERO;
                self.terms = Some(t);
                self.status = Status::Live;
            }
            other => {
                let terms = self
                    .terms
                    .as_mut()
                    .ok_or_else(|| format!("{other} before NEW"))?;
                match other {
                    "AMEND" => {
                        let a: Amend = parse(e)?;
                        check_range(
                            a.quantity.unwrap_or(terms.quantity),
                            a.price.unwrap_or(terms.price),
                        )?;
                        if let Some(q) = a.quantity {
                            // Exercised quantity stays exercised.
                            terms.quantity = q;
                            if self.status == Status::Live {
                                self.open_quantity = (q - self.exercised).max(Decimal::ZERO);
                            }
                        }
                        if let Some(p) = a.price {
                            terms.price = p;
                        }
                        if let Some(d) = a.settlement_date {
                            terms.settlement_date = d;
                        }
                    }
                    "CANCEL" => self.status = Status::Cancelled,
                    "NOVATE" => terms.counterparty = parse::<Novate>(e)?.new_counterparty,
                    "EXERCISE" => {
                        let x = parse::<Exercise>(e)?.quantity.min(self.open_quantity);
                        self.open_quantity -= x;
                        self.exercised += x;
                    }
                    "SETTLE" => {
                        self.status = Status::Settled;
                        self.open_quantity = Decimal::ZERO;
                    }
                    // Corrections of a booking error (engine::aggregate::correction_of)
                    // and other annotations do not change the terms.
                    _ => {}
                }
            }
        }
        self.events += 1;
        Ok(())
    }

    fn encode_snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn decode_snapshot(bytes: &[u8]) -> Option<Trade> {
        serde_json::from_slice(bytes).ok()
    }
}

/// One live trade, as the positions projection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct OpenTrade {
    book: String,
    instrument: String,
    sign: Decimal,
    /// Open quantity, positive.
    open: Decimal,
    price: Decimal,
    quantity: Decimal,
    /// Quantity closed by exercises and settlement.
    closed: Decimal,
}

/// One book and instrument's position.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Position {
    /// Open quantity, buys positive.
    pub quantity: Decimal,
    /// Sum of open quantity times trade price.
    pub cost: Decimal,
    /// P&L realised by exercises and settlements.
    pub realised: Decimal,
    /// `quantity x mark - cost`.
    pub unrealised: Decimal,
    /// The mark used.
    pub mark: Option<Decimal>,
}

/// Positions and P&L per book and instrument.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Positions {
    trades: BTreeMap<String, OpenTrade>,
    marks: BTreeMap<String, Decimal>,
    realised: BTreeMap<(String, String), Decimal>,
    /// Events seen that could not be attributed (an event for an unknown trade).
    pub orphans: u64,
    /// Partitions changed since the last checkpoint (see the `Partitions` impl).
    changed: ChangedKeys,
}

impl Positions {
    /// The positions, by `(book, instrument)`.
    #[must_use]
    pub fn table(&self) -> BTreeMap<(String, String), Position> {
        let mut out: BTreeMap<(String, String), Position> = BTreeMap::new();
        for t in self.trades.values() {
            let p = out
                .entry((t.book.clone(), t.instrument.clone()))
                .or_default();
            p.quantity += t.sign * t.open;
            p.cost += t.sign * t.open * t.price;
        }
        for (k, r) in &self.realised {
            out.entry(k.clone()).or_default().realised = *r;
        }
        for ((_, instrument), p) in &mut out {
            p.mark = self.marks.get(instrument).copied();
            p.unrealised = match p.mark {
                Some(m) => p.quantity * m - p.cost,
                None => Decimal::ZERO,
            };
        }
        out
    }

    fn close(&mut self, trade_id: &str, quantity: Decimal) {
        let Some(t) = self.trades.get_mut(trade_id) else {
            self.orphan();
            return;
        };
        let x = quantity.min(t.open);
        let mark = self.marks.get(&t.instrument).copied().unwrap_or(t.price);
        *self
            .realised
            .entry((t.book.clone(), t.instrument.clone()))
            .or_default() += t.sign * x * (mark - t.price);
        t.open -= x;
        t.closed += x;
        self.changed
            .mark(realised_key(&t.book, &t.instrument).into_bytes());
        self.changed.mark(trade_key(trade_id).into_bytes());
    }

    fn cancel(&mut self, trade_id: &str) {
        if self.trades.remove(trade_id).is_none() {
            self.orphan();
        }
    }

    fn orphan(&mut self) {
        self.orphans += 1;
        self.changed.mark(ORPHANS_KEY.as_bytes().to_vec());
    }
}

// Partition keys of `Positions`, in this order of their bytes: marks, the orphan count,
// realised P&L per book and instrument, trades.
const ORPHANS_KEY: &str = "o";

fn mark_key(instrument: &str) -> String {
    format!("m/{instrument}")
}

fn realised_key(book: &str, instrument: &str) -> String {
    // The book's length first, so that any two names (a NUL or a digit in them included)
    // give one key each and the key gives them back.
    format!("r/{}:{book}{instrument}", book.len())
}

/// The book and instrument of a realised P&L key.
fn realised_names(key: &str) -> Option<(&str, &str)> {
    let (len, rest) = key.strip_prefix("r/")?.split_once(':')?;
    let len: usize = len.parse().ok()?;
    Some((rest.get(..len)?, rest.get(len..)?))
}

/// The longest book or instrument name the positions take: a partition key holds one.
const NAME_BYTES_MAX: usize = 256;

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "a {what} name of {} bytes, more than {NAME_BYTES_MAX}",
            name.len()
        ));
    }
    Ok(())
}

fn trade_key(id: &str) -> String {
    format!("t/{id}")
}

/// An open trade as stored: book, instrument, then sign, open, price, quantity and closed
/// as normalised decimal text (the canonical form both encodings of the positions use).
type TradeRow = (String, String, String, String, String, String, String);

fn trade_row(t: &OpenTrade) -> TradeRow {
    let text = |d: Decimal| d.normalize().to_string();
    (
        t.book.clone(),
        t.instrument.clone(),
        text(t.sign),
        text(t.open),
        text(t.price),
        text(t.quantity),
        text(t.closed),
    )
}

fn trade_from_row(row: TradeRow) -> Option<OpenTrade> {
    let (book, instrument, sign, open, price, quantity, closed) = row;
    let d = |s: &str| s.parse::<Decimal>().ok();
    Some(OpenTrade {
        book,
        instrument,
        sign: d(&sign)?,
        open: d(&open)?,
        price: d(&price)?,
        quantity: d(&quantity)?,
        closed: d(&closed)?,
    })
}

fn encode_trade(t: &OpenTrade) -> Vec<u8> {
    serde_json::to_vec(&trade_row(t)).unwrap_or_else(|e| unreachable!("{e}"))
}

fn decode_trade(bytes: &[u8]) -> Option<OpenTrade> {
    trade_from_row(serde_json::from_slice(bytes).ok()?)
}

fn decimal_text(d: Decimal) -> Vec<u8> {
    d.normalize().to_string().into_bytes()
}

fn parse_decimal(bytes: &[u8]) -> Result<Decimal, String> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "a partition's decimal does not parse".to_owned())
}

/// Checkpoints of the positions write only the trades, marks and P&L that changed since
/// the last one: a desk's book of a million open trades costs what a thousand events
/// changed, not the whole book.
impl Partitions for Positions {
    fn each_partition(&self, f: &mut PartitionVisitor<'_>) -> std::io::Result<()> {
        for (i, m) in &self.marks {
            f(mark_key(i).as_bytes(), &decimal_text(*m))?;
        }
        // No partition while there is no orphan, so that the initial state has none (a
        // delta checkpoint loads on top of it).
        if self.orphans > 0 {
            f(ORPHANS_KEY.as_bytes(), self.orphans.to_string().as_bytes())?;
        }
        // In the order of the keys' bytes, which is not the pairs' order.
        let mut realised: Vec<(String, Decimal)> = self
            .realised
            .iter()
            .map(|((b, i), r)| (realised_key(b, i), *r))
            .collect();
        realised.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (k, r) in realised {
            f(k.as_bytes(), &decimal_text(r))?;
        }
        for (id, t) in &self.trades {
            f(trade_key(id).as_bytes(), &encode_trade(t))?;
        }
        Ok(())
    }

    fn encode_partition(&self, key: &[u8]) -> Option<Vec<u8>> {
        let key = std::str::from_utf8(key).ok()?;
        if key == ORPHANS_KEY {
            return (self.orphans > 0).then(|| self.orphans.to_string().into_bytes());
        }
        if let Some(i) = key.strip_prefix("m/") {
            return self.marks.get(i).map(|m| decimal_text(*m));
        }
        if let Some((b, i)) = realised_names(key) {
            return self
                .realised
                .get(&(b.to_owned(), i.to_owned()))
                .map(|r| decimal_text(*r));
        }
        let id = key.strip_prefix("t/")?;
        self.trades.get(id).map(encode_trade)
    }

    fn load_partition(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        let key = std::str::from_utf8(key).map_err(|_| "a partition key is not UTF-8")?;
        if key == ORPHANS_KEY {
            self.orphans = match value {
                None => 0,
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("the orphan count does not parse")?,
            };
        } else if let Some(i) = key.strip_prefix("m/") {
            match value {
                Some(v) => {
                    self.marks.insert(i.to_owned(), parse_decimal(v)?);
                }
                None => {
                    self.marks.remove(i);
                }
            }
        } else if let Some((b, i)) = realised_names(key) {
            let k = (b.to_owned(), i.to_owned());
            match value {
                Some(v) => {
                    self.realised.insert(k, parse_decimal(v)?);
                }
                None => {
                    self.realised.remove(&k);
                }
            }
        } else if let Some(id) = key.strip_prefix("t/") {
            match value {
                Some(v) => {
                    let t = decode_trade(v).ok_or("a trade partition does not decode")?;
                    self.trades.insert(id.to_owned(), t);
                }
                None => {
                    self.trades.remove(id);
                }
            }
        } else {
            return Err(format!("unknown partition {key:?}"));
        }
        Ok(())
    }

    fn take_changed(&mut self) -> Vec<Vec<u8>> {
        self.changed.take()
    }
}

fn trade_id_of(stream: &str) -> Option<&str> {
    stream.strip_prefix("trade-")
}

impl Projection for Positions {
    const STATE_VERSION: u32 = 2;

    fn initial() -> Positions {
        Positions::default()
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        if e.event_type() == "PRICE" {
            let p: MarketPrice = parse(e)?;
            check_range(Decimal::ONE, p.price)?;
            check_name("instrument", &p.instrument)?;
            self.changed.mark(mark_key(&p.instrument).into_bytes());
            self.marks.insert(p.instrument, p.price);
            return Ok(());
        }
        let Some(id) = trade_id_of(e.stream()) else {
            return Ok(());
        };
        self.changed.mark(trade_key(id).into_bytes());
        match e.event_type() {
            "NEW" => {
                let t: NewTrade = parse(e)?;
                check_range(t.quantity, t.price)?;
                check_name("book", &t.book)?;
                check_name("instrument", &t.instrument)?;
                self.trades.insert(
                    id.to_owned(),
                    OpenTrade {
                        book: t.book,
                        instrument: t.instrument,
                        sign: t.side.sign(),
                        open: t.quantity,
                        price: t.price,
                        quantity: t.quantity,
                        closed: Decimal::ZERO,
                    },
                );
            }
            "AMEND" => {
                let a: Amend = parse(e)?;
                match self.trades.get_mut(id) {
                    Some(t) => {
                        check_range(a.quantity.unwrap_or(t.quantity), a.price.unwrap_or(t.price))?;
                        if let Some(q) = a.quantity {
                            t.quantity = q;
                            t.open = (q - t.closed).max(Decimal::ZERO);
                        }
                        if let Some(p) = a.price {
                            t.price = p;
                        }
                    }
                    None => self.orphan(),
                }
            }
            "CANCEL" => self.cancel(id),
            "EXERCISE" => {
                let x: Exercise = parse(e)?;
                self.close(id, x.quantity);
            }
            "SETTLE" => {
                // Settled trades stay (with nothing open), so that their part of the
                // state still names them in a replay's trace.
                let open = self.trades.get(id).map_or(Decimal::ZERO, |t| t.open);
                self.close(id, open);
            }
            _ => {}
        }
        Ok(())
    }

    fn encode_state(&self) -> Vec<u8> {
        // Canonical: BTreeMaps in key order, decimals in their normalised text.
        let trades: Vec<_> = self
            .trades
            .iter()
            .map(|(id, t)| {
                let (book, instrument, sign, open, price, quantity, closed) = trade_row(t);
                (id, book, instrument, sign, open, price, quantity, closed)
            })
            .collect();
        let marks: Vec<_> = self
            .marks
            .iter()
            .map(|(k, v)| (k, v.normalize().to_string()))
            .collect();
        let realised: Vec<_> = self
            .realised
            .iter()
            .map(|((b, i), v)| (b, i, v.normalize().to_string()))
            .collect();
        serde_json::to_vec(&(trades, marks, realised, self.orphans))
            .unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn partitions(&self) -> Option<&dyn Partitions> {
        Some(self)
    }

    fn partitions_mut(&mut self) -> Option<&mut dyn Partitions> {
        Some(self)
    }

    fn decode_state(bytes: &[u8]) -> Option<Positions> {
        type Row = (
            String,
            String,
            String,
            String,
            String,
            String,
            String,
            String,
        );
        type Encoded = (
            Vec<Row>,
            Vec<(String, String)>,
            Vec<(String, String, String)>,
            u64,
        );
        let (trades, marks, realised, orphans): Encoded = serde_json::from_slice(bytes).ok()?;
        let d = |s: &str| s.parse::<Decimal>().ok();
        let mut p = Positions {
            orphans,
            ..Positions::default()
        };
        for (id, book, instrument, sign, open, price, quantity, closed) in trades {
            let row = (book, instrument, sign, open, price, quantity, closed);
            p.trades.insert(id, trade_from_row(row)?);
        }
        for (k, v) in marks {
            p.marks.insert(k, d(&v)?);
        }
        for (b, i, v) in realised {
            p.realised.insert((b, i), d(&v)?);
        }
        Some(p)
    }
}

impl tally_engine::replay::Traced for Positions {
    /// A trade's events change its trade's part; a price changes its instrument's mark.
    fn key_of(e: &dyn EventView) -> Option<String> {
        if e.event_type() == "PRICE" {
            // The instrument the projection applies the price to: the payload's.
            let p: MarketPrice = serde_json::from_slice(e.payload()).ok()?;
            return Some(format!("mark:{}", p.instrument));
        }
        trade_id_of(e.stream()).map(|id| format!("trade:{id}"))
    }

    fn encode_part(&self, key: &str) -> Vec<u8> {
        if let Some(i) = key.strip_prefix("mark:") {
            return self
                .marks
                .get(i)
                .map(|m| m.normalize().to_string())
                .unwrap_or_default()
                .into_bytes();
        }
        let id = key.strip_prefix("trade:").unwrap_or(key);
        match self.trades.get(id) {
            None => b"closed".to_vec(),
            Some(t) => {
                let realised = self
                    .realised
                    .get(&(t.book.clone(), t.instrument.clone()))
                    .copied()
                    .unwrap_or_default();
                format!(
                    "{} {} {} {} {} {}",
                    t.book,
                    t.instrument,
                    t.sign,
                    t.open.normalize(),
                    t.price.normalize(),
                    realised.normalize()
                )
                .into_bytes()
            }
        }
    }
}

/// A deterministic event id for a generated event: the same seed and counter give the
/// same id, so a duplicate delivery is the same event.
#[must_use]
pub fn event_id(seed: u64, n: u64) -> EventId {
    // A version 8 (custom) UUID: the counter's low 48 bits, then the seed's 64 bits around
    // the version and variant bits, so that distinct (seed, counter) pairs give distinct
    // ids (for counters below 2^48).
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&n.to_le_bytes()[..6]);
    b[6] = 0x80 | (seed & 0x0f) as u8;
    b[7] = (seed >> 4) as u8;
    b[8] = 0x80 | ((seed >> 12) & 0x3f) as u8;
    b[9..16].copy_from_slice(&(seed >> 18).to_le_bytes()[..7]);
    EventId(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_engine::aggregate::{Repository, SnapshotPolicy};
    use tally_engine::projection::{Projector, ProjectorOptions};
    use tally_engine::{ExpectedVersion, Log, Options};

    fn dec(s: &str) -> Decimal {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn terms(id: &str, book: &str, side: Side, q: &str, p: &str) -> NewTrade {
        NewTrade {
            trade_id: id.into(),
            book: book.into(),
            counterparty: "BANK-A".into(),
            instrument: "BRENT-DEC26".into(),
            side,
            quantity: dec(q),
            price: dec(p),
            trade_date: "2026-11-23".into(),
            settlement_date: "2026-11-25".into(),
        }
    }

    /// Positions by partition: keys strictly ascend whatever the names hold (a NUL, a
    /// colon, digits, one name a prefix of another), and loading the partitions gives the
    /// same state back.
    #[test]
    fn positions_partitions_round_trip_with_awkward_names() {
        let mut p = Positions::initial();
        let names = [
            ("a", "z"),
            ("a\0b", "z"),
            ("a", "\0x"),
            ("a\0", "x"),
            ("1:x", "y"),
            ("10", ""),
        ];
        for (i, (book, instrument)) in names.iter().enumerate() {
            p.realised.insert(
                ((*book).to_owned(), (*instrument).to_owned()),
                Decimal::from(i as i64 + 1),
            );
            p.marks.insert((*instrument).to_owned(), Decimal::from(7));
            p.trades.insert(
                format!("T{i}"),
                OpenTrade {
                    book: (*book).to_owned(),
                    instrument: (*instrument).to_owned(),
                    sign: Decimal::ONE,
                    open: dec("5"),
                    price: dec("80.5"),
                    quantity: dec("5"),
                    closed: Decimal::ZERO,
                },
            );
        }
        p.orphans = 3;
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        p.each_partition(&mut |k, v| {
            entries.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            entries.windows(2).all(|w| w[0].0 < w[1].0),
            "keys ascend, each once"
        );
        let mut back = Positions::initial();
        for (k, v) in &entries {
            assert_eq!(p.encode_partition(k).as_deref(), Some(v.as_slice()));
            back.load_partition(k, Some(v))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(back.encode_state(), p.encode_state());
        // A removed partition loads as a removal.
        let gone = realised_key("a\0b", "z");
        back.load_partition(gone.as_bytes(), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !back
                .realised
                .contains_key(&("a\0b".to_owned(), "z".to_owned()))
        );
        assert_eq!(back.realised.len(), names.len() - 1);
    }

    #[test]
    fn lifecycle_positions_and_pnl_are_exact() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let log = Log::open(dir.path(), Options::default()).unwrap_or_else(|e| panic!("{e}"));
        let repo = Repository::<Trade>::new(&log, SnapshotPolicy::EveryEvents(2));
        let ok = |r: Result<EventData, TradeError>| r.unwrap_or_else(|e| panic!("{e}"));
        // T1: buy 100 @ 81.10, amended to 150 @ 81.05, novated, 40 exercised at 82.00,
        // then settled at 81.50. T2: sell 30 @ 81.20, cancelled. T3: sell 10 @ 81.00, open.
        for (id, side, q, p) in [
            ("T1", Side::Buy, "100", "81.10"),
            ("T2", Side::Sell, "30", "81.20"),
            ("T3", Side::Sell, "10", "81.00"),
        ] {
            let s = trade_stream(id);
            let mut t = repo.load(&s).unwrap_or_else(|e| panic!("{e}"));
            repo.save(
                &s,
                &mut t,
                &[ok(Trade::book(&terms(id, "OIL-1", side, q, p)))],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let s1 = trade_stream("T1");
        let step = |f: &dyn Fn(&Trade) -> Result<EventData, TradeError>| {
            let mut t = repo.load(&s1).unwrap_or_else(|e| panic!("{e}"));
            let ev = f(&t.state).unwrap_or_else(|e| panic!("{e}"));
            repo.save(&s1, &mut t, &[ev])
                .unwrap_or_else(|e| panic!("{e}"));
        };
        step(&|t| {
            t.amend(&Amend {
                quantity: Some(dec("150")),
                price: Some(dec("81.05")),
                settlement_date: None,
            })
        });
        step(&|t| t.novate("BANK-B"));
        let px = |p: &str| {
            log.append(
                &price_stream("BRENT-DEC26"),
                ExpectedVersion::Any,
                &[price_event("BRENT-DEC26", dec(p))],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        };
        px("82.00");
        step(&|t| t.exercise(dec("40")));
        let s2 = trade_stream("T2");
        let mut t2 = repo.load(&s2).unwrap_or_else(|e| panic!("{e}"));
        let cancel = ok(t2.state.cancel("booked to the wrong book"));
        repo.save(&s2, &mut t2, &[cancel])
            .unwrap_or_else(|e| panic!("{e}"));
        px("81.50");
        // A settled or cancelled trade refuses further commands.
        assert_eq!(
            t2.state.cancel("again"),
            Err(TradeError::NotLive(Status::Cancelled))
        );
        let t1 = repo.load(&s1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            t1.state.exercise(dec("111")).map(|_| ()),
            Err(TradeError::Invalid("exercise of 111 with 110 open".into()))
        );
        step(&|t| t.settle("2026-11-25"));
        let t1 = repo.load(&s1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t1.state.status, Status::Settled);
        assert_eq!(
            t1.state.terms.as_ref().map(|t| t.counterparty.as_str()),
            Some("BANK-B")
        );
        assert_eq!(t1.state.open_quantity, Decimal::ZERO);
        // The snapshots (every 2 events) agree with a fold from the first event.
        let plain = repo
            .load_without_snapshots(&s1, u64::MAX)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t1.state, plain.state);

        let mut p = Projector::<Positions>::open(&log, "positions", ProjectorOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        p.catch_up().unwrap_or_else(|e| panic!("{e}"));
        let table = p.shared_state().read().table();
        let pos = &table[&("OIL-1".to_owned(), "BRENT-DEC26".to_owned())];
        // Realised: T1's 40 exercised at 82.00: 40 x (82.00 - 81.05) = 38.00; its other
        // 110 settled at 81.50: 110 x (81.50 - 81.05) = 49.50. Total 87.50.
        assert_eq!(pos.realised, dec("87.50"));
        // Open: only T3, sell 10 @ 81.00: quantity -10, cost -810.00; mark 81.50:
        // unrealised -10 x 81.50 + 810.00 = -5.00.
        assert_eq!(pos.quantity, dec("-10"));
        assert_eq!(pos.cost, dec("-810.00"));
        assert_eq!(pos.unrealised, dec("-5.00"));
        assert_eq!(p.shared_state().read().orphans, 0);
        // The state survives its checkpoint encoding exactly.
        let state = p.shared_state();
        let encoded = state.read().encode_state();
        let back = Positions::decode_state(&encoded).unwrap_or_else(|| panic!("decodes"));
        assert_eq!(back.table(), table);
        assert_eq!(back.encode_state(), encoded, "canonical encoding");
        // Opened again, the projection resumes from its checkpoint (a partitioned state
        // starts with no partition), and holds the same state.
        drop(p);
        let again = Projector::<Positions>::open(&log, "positions", ProjectorOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            again.refused_checkpoints().is_empty(),
            "{:?}",
            again.refused_checkpoints()
        );
        assert_eq!(again.status().checkpoint, Some(log.next_position().0 - 1));
        assert_eq!(again.shared_state().read().encode_state(), encoded);
    }

    #[test]
    fn amendments_respect_exercised_quantity_and_ranges() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let log = Log::open(dir.path(), Options::default()).unwrap_or_else(|e| panic!("{e}"));
        let repo = Repository::<Trade>::new(&log, SnapshotPolicy::OnDemand);
        let s = trade_stream("X");
        let mut t = repo.load(&s).unwrap_or_else(|e| panic!("{e}"));
        let new =
            Trade::book(&terms("X", "B", Side::Buy, "100", "10")).unwrap_or_else(|e| panic!("{e}"));
        repo.save(&s, &mut t, &[new])
            .unwrap_or_else(|e| panic!("{e}"));
        let ex = t
            .state
            .exercise(dec("50"))
            .unwrap_or_else(|e| panic!("{e}"));
        repo.save(&s, &mut t, &[ex])
            .unwrap_or_else(|e| panic!("{e}"));
        let below = Amend {
            quantity: Some(dec("40")),
            ..Amend::default()
        };
        assert!(matches!(t.state.amend(&below), Err(TradeError::Invalid(_))));
        let up = t
            .state
            .amend(&Amend {
                quantity: Some(dec("120")),
                ..Amend::default()
            })
            .unwrap_or_else(|e| panic!("{e}"));
        repo.save(&s, &mut t, &[up])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.state.open_quantity, dec("70"));
        let mut p = Projector::<Positions>::open(&log, "p", ProjectorOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        p.catch_up().unwrap_or_else(|e| panic!("{e}"));
        let table = p.shared_state().read().table();
        assert_eq!(
            table[&("B".to_owned(), "BRENT-DEC26".to_owned())].quantity,
            dec("70")
        );
        // Out of range: refused by the command, and by the projection if written anyway.
        assert!(Trade::book(&terms("Y", "B", Side::Buy, "10000000000000", "1")).is_err());
        log.append(
            &trade_stream("Z"),
            ExpectedVersion::Any,
            &[json(
                "NEW",
                &terms("Z", "B", Side::Buy, "1", "100000000000"),
            )],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            p.catch_up().is_err(),
            "the projection refuses it instead of overflowing"
        );
    }

    #[test]
    fn generated_ids_are_deterministic_and_distinct() {
        assert_eq!(event_id(7, 1), event_id(7, 1));
        assert_ne!(event_id(7, 1), event_id(7, 2));
        assert_ne!(event_id(7, 1), event_id(8, 1));
        // Every counter value of a run, and seeds that differ in any bit, give new ids.
        let ids: std::collections::HashSet<_> = (0..100_000).map(|n| event_id(42, n)).collect();
        assert_eq!(ids.len(), 100_000);
        for bit in 0..64 {
            assert_ne!(event_id(0, 5), event_id(1 << bit, 5), "seed bit {bit}");
        }
    }
}
