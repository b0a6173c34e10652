//! The HL7 v2 fast path: the MSH segment split by hand, and ACKs.
//!
//! Routing and acknowledging need only MSH, so there is no full parser here
//! (see DESIGN.md, "HL7"). Field numbers follow the standard: MSH-1 is the
//! field separator itself, so in the split segment MSH-n is at index n - 1.

use std::time::{SystemTime, UNIX_EPOCH};

/// Errors reading an HL7 message or ACK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Hl7Error {
    /// The message does not start with an MSH segment.
    #[error("message does not start with an msh segment")]
    NotMsh,
    /// MSH-1 or MSH-2 is unusable.
    #[error("msh segment has invalid separators")]
    BadSeparators,
    /// A required field is empty or absent.
    #[error("required field {field} is missing")]
    MissingField {
        /// The field, e.g. `MSH-10`.
        field: &'static str,
    },
    /// A required segment is absent.
    #[error("required segment {segment} is missing")]
    MissingSegment {
        /// The segment id, e.g. `MSA`.
        segment: &'static str,
    },
    /// MSA-1 holds something other than an acknowledgment code.
    #[error("unknown acknowledgment code {code:?}")]
    UnknownAckCode {
        /// The code as received.
        code: String,
    },
}

/// The MSH fields routing and ACKs need. Field values are kept as received
/// (still escaped), so copying them into an ACK needs no re-escaping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msh {
    /// MSH-1.
    pub field_separator: u8,
    /// MSH-2: component, repetition, escape and subcomponent separators
    /// (and the truncation character in v2.7+), as received.
    pub encoding_characters: String,
    /// MSH-3.
    pub sending_application: String,
    /// MSH-4.
    pub sending_facility: String,
    /// MSH-5.
    pub receiving_application: String,
    /// MSH-6.
    pub receiving_facility: String,
    /// MSH-9.1, e.g. `ADT`.
    pub message_code: String,
    /// MSH-9.2, e.g. `A01`; empty when absent.
    pub trigger_event: String,
    /// MSH-10: what the sender expects back in MSA-2.
    pub control_id: String,
    /// MSH-11, whole (it may carry a processing mode component).
    pub processing_id: String,
    /// MSH-12, whole.
    pub version: String,
}

/// Whether `b` may serve as a separator (MSH-1, or a character of MSH-2):
/// printable ASCII that is not a letter or digit. A letter or digit would
/// make field values ambiguous, and a byte above 0x7F is not one character
/// once the ACK is written as UTF-8. Found by fuzzing (`fuzz/`, `hl7_ack`).
fn is_separator(b: u8) -> bool {
    b.is_ascii_graphic() && !b.is_ascii_alphanumeric()
}

/// The separators used when an inbound message is too broken to supply its own.
const DEFAULT_ENCODING_CHARACTERS: &str = "^~\\&";

impl Msh {
    /// Reads the MSH segment at the start of `message`.
    pub fn parse(message: &[u8]) -> Result<Msh, Hl7Error> {
        if message.len() < 8 || &message[..3] != b"MSH" {
            return Err(Hl7Error::NotMsh);
        }
        let fs = message[3];
        if !is_separator(fs) {
            return Err(Hl7Error::BadSeparators);
        }
        let end = message
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .unwrap_or(message.len());
        let fields: Vec<&[u8]> = message[..end].split(|&b| b == fs).collect();
        let field = |n: usize| -> String {
            fields
                .get(n - 1)
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .unwrap_or_default()
        };
        let encoding = fields.get(1).copied().unwrap_or_default();
        let distinct_separators = encoding
            .iter()
            .enumerate()
            .all(|(i, &c)| is_separator(c) && !encoding[..i].contains(&c));
        if encoding.is_empty() || !distinct_separators {
            return Err(Hl7Error::BadSeparators);
        }
        let encoding_characters = field(2);
        let component = encoding[0] as char;
        let message_type = field(9);
        let mut components = message_type.split(component);
        let message_code = components.next().unwrap_or_default().to_owned();
        let trigger_event = components.next().unwrap_or_default().to_owned();
        if message_code.is_empty() {
            return Err(Hl7Error::MissingField { field: "MSH-9" });
        }
        let control_id = field(10);
        if control_id.is_empty() {
            return Err(Hl7Error::MissingField { field: "MSH-10" });
        }
        Ok(Msh {
            field_separator: fs,
            encoding_characters,
            sending_application: field(3),
            sending_facility: field(4),
            receiving_application: field(5),
            receiving_facility: field(6),
            message_code,
            trigger_event,
            control_id,
            processing_id: field(11),
            version: field(12),
        })
    }

    /// A stand-in for a message whose MSH could not be read, so it can still
    /// be refused with an AR: default separators, empty fields.
    pub fn unreadable() -> Msh {
        Msh {
            field_separator: b'|',
            encoding_characters: DEFAULT_ENCODING_CHARACTERS.to_owned(),
            sending_application: String::new(),
            sending_facility: String::new(),
            receiving_application: String::new(),
            receiving_facility: String::new(),
            message_code: String::new(),
            trigger_event: String::new(),
            control_id: String::new(),
            processing_id: "P".to_owned(),
            version: "2.5".to_owned(),
        }
    }

    fn separator(&self, index: usize, default: u8) -> u8 {
        self.encoding_characters
            .as_bytes()
            .get(index)
            .copied()
            .unwrap_or(default)
    }
}

/// MSA-1. The C codes are for enhanced-mode (commit) acknowledgment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckCode {
    /// Application accept.
    AA,
    /// Application error: the receiver could not process it; the sender may retry.
    AE,
    /// Application reject: the message itself is unacceptable.
    AR,
    /// Commit accept.
    CA,
    /// Commit error.
    CE,
    /// Commit reject.
    CR,
}

impl AckCode {
    /// The code as written in MSA-1.
    pub fn as_str(self) -> &'static str {
        match self {
            AckCode::AA => "AA",
            AckCode::AE => "AE",
            AckCode::AR => "AR",
            AckCode::CA => "CA",
            AckCode::CE => "CE",
            AckCode::CR => "CR",
        }
    }

    /// Whether the receiver took responsibility for the message.
    pub fn is_accept(self) -> bool {
        matches!(self, AckCode::AA | AckCode::CA)
    }
}

impl std::fmt::Display for AckCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AckCode {
    type Err = Hl7Error;

    fn from_str(s: &str) -> Result<Self, Hl7Error> {
        Ok(match s {
            "AA" => AckCode::AA,
            "AE" => AckCode::AE,
            "AR" => AckCode::AR,
            "CA" => AckCode::CA,
            "CE" => AckCode::CE,
            "CR" => AckCode::CR,
            other => {
                return Err(Hl7Error::UnknownAckCode {
                    code: other.to_owned(),
                });
            }
        })
    }
}

/// An HL7 v2 version, read from MSH-12 and compared numerically, so that
/// `2.3 < 2.3.1 < 2.4 < 2.5 < 2.5.1 < 2.8`.
///
/// The ACK's shape depends on it (see [`build_ack_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hl7Version {
    major: u16,
    minor: u16,
    /// `1` in `2.3.1`; `0` when the version has two parts.
    patch: u16,
}

impl Hl7Version {
    /// The first version whose MSH-9 has a third component, the message
    /// structure (`ACK` for an ACK).
    pub const V2_3_1: Hl7Version = Hl7Version::new(2, 3, 1);
    /// The version that deprecated MSA-3 (text message) in favour of ERR.
    pub const V2_4: Hl7Version = Hl7Version::new(2, 4, 0);
    /// What an ACK assumes when the inbound MSH-12 is missing or unreadable:
    /// the version the engine's own tests and peers speak, and the one whose
    /// ACK form is a superset of the others' (MSA-3 and ERR both filled).
    pub const V2_5: Hl7Version = Hl7Version::new(2, 5, 0);
    /// The version that withdrew MSA-3 from the standard.
    pub const V2_7: Hl7Version = Hl7Version::new(2, 7, 0);

    /// `major.minor.patch`.
    pub const fn new(major: u16, minor: u16, patch: u16) -> Hl7Version {
        Hl7Version {
            major,
            minor,
            patch,
        }
    }

    /// Reads the version ID out of an MSH-12 value: `2.5`, `2.3.1`, or the
    /// composite form `2.5^DEU^...` (only the first component counts).
    /// `None` unless that component is two or three dot-separated numbers.
    pub fn parse(field: &str, component_separator: char) -> Option<Hl7Version> {
        let id = field.split(component_separator).next()?.trim();
        let mut parts = id.split('.').map(|p| {
            if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                p.parse::<u16>().ok()
            } else {
                None
            }
        });
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = match parts.next() {
            None => 0,
            Some(p) => p?,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Hl7Version::new(major, minor, patch))
    }
}

impl std::fmt::Display for Hl7Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.patch == 0 {
            write!(f, "{}.{}", self.major, self.minor)
        } else {
            write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
        }
    }
}

impl Msh {
    /// The version in MSH-12, if it can be read (see [`Hl7Version::parse`]).
    pub fn hl7_version(&self) -> Option<Hl7Version> {
        Hl7Version::parse(&self.version, self.separator(0, b'^') as char)
    }
}

/// The codes of HL7 table 0357 (message error condition) this crate sends in
/// ERR-3 (all of them defined since v2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCondition {
    /// 0: success; sent with a note on an accepting ACK.
    MessageAccepted,
    /// 100: segments out of order, or a required segment missing (for us: the
    /// message does not start with MSH, or an ACK has no MSA).
    SegmentSequenceError,
    /// 101: a required field is empty (MSH-9, MSH-10, MSA-1).
    RequiredFieldMissing,
    /// 102: a field holds data of the wrong type (for us: unusable MSH-1/MSH-2).
    DataTypeError,
    /// 103: a coded value is not in its table (for us: MSA-1).
    TableValueNotFound,
    /// 207: the table's catch-all for errors no other code covers. The engine's
    /// AEs (downstream delivery or queue write failed) are of this kind.
    ApplicationInternalError,
}

impl ErrorCondition {
    /// The code as written in ERR-3.1.
    pub fn code(self) -> &'static str {
        match self {
            ErrorCondition::MessageAccepted => "0",
            ErrorCondition::SegmentSequenceError => "100",
            ErrorCondition::RequiredFieldMissing => "101",
            ErrorCondition::DataTypeError => "102",
            ErrorCondition::TableValueNotFound => "103",
            ErrorCondition::ApplicationInternalError => "207",
        }
    }

    /// The table's display text, written in ERR-3.2.
    pub fn text(self) -> &'static str {
        match self {
            ErrorCondition::MessageAccepted => "Message accepted",
            ErrorCondition::SegmentSequenceError => "Segment sequence error",
            ErrorCondition::RequiredFieldMissing => "Required field missing",
            ErrorCondition::DataTypeError => "Data type error",
            ErrorCondition::TableValueNotFound => "Table value not found",
            ErrorCondition::ApplicationInternalError => "Application internal error",
        }
    }

    /// The condition reported when the caller gives only an acknowledgment
    /// code: 0 for an accept, else 207, the catch-all.
    pub fn default_for(code: AckCode) -> ErrorCondition {
        if code.is_accept() {
            ErrorCondition::MessageAccepted
        } else {
            ErrorCondition::ApplicationInternalError
        }
    }
}

impl Hl7Error {
    /// The table 0357 condition that describes this error to the sender.
    pub fn condition(&self) -> ErrorCondition {
        match self {
            Hl7Error::NotMsh | Hl7Error::MissingSegment { .. } => {
                ErrorCondition::SegmentSequenceError
            }
            Hl7Error::BadSeparators => ErrorCondition::DataTypeError,
            Hl7Error::MissingField { .. } => ErrorCondition::RequiredFieldMissing,
            Hl7Error::UnknownAckCode { .. } => ErrorCondition::TableValueNotFound,
        }
    }
}

/// Builds the ACK for `msh`, timestamped now (UTC).
pub fn build_ack(msh: &Msh, code: AckCode, control_id: &str, text: Option<&str>) -> Vec<u8> {
    build_ack_at(
        msh,
        code,
        control_id,
        text,
        &hl7_timestamp(SystemTime::now()),
    )
}

/// Builds the ACK for `msh` with MSH-7 = `timestamp` (an HL7 DTM such as
/// `20240131235959`), in the form of the inbound version (MSH-12).
///
/// Always: MSH-3/4 and MSH-5/6 are swapped, MSH-10 is `control_id`,
/// MSH-11/12 are copied, MSA-2 is the inbound MSH-10, the inbound separators
/// are used and every segment ends with `\r`.
///
/// By version (a missing or unreadable MSH-12 counts as 2.5):
/// - MSH-9 is `ACK^<trigger>` before 2.3.1, which has no message structure
///   component, and `ACK^<trigger>^ACK` from 2.3.1 on.
/// - `text` (escaped) goes into MSA-3 before 2.7. MSA-3 is deprecated from
///   2.4 but only withdrawn in 2.7, and receivers written for those versions
///   still read it, so it is kept as long as the standard defines it.
/// - From 2.4 on, `text` also goes into an ERR segment in the v2.5 form:
///   ERR-3 = a table 0357 condition ([`ErrorCondition::default_for`] the
///   code: 207 for errors and rejects), ERR-4 = severity `E` (`I` on an
///   accept), ERR-8 = `text`. (v2.4's own ERR has only ERR-1; a v2.4 receiver
///   ignores the later fields and reads MSA-3.)
/// - Before 2.4 no ERR is written: ERR then has only ERR-1, whose error code
///   in v2.3 refers to a locally defined table, and MSA-3 says it all.
pub fn build_ack_at(
    msh: &Msh,
    code: AckCode,
    control_id: &str,
    text: Option<&str>,
    timestamp: &str,
) -> Vec<u8> {
    let detail = text.map(|t| (ErrorCondition::default_for(code), t));
    write_ack(msh, code, control_id, detail, timestamp)
}

/// Builds the AR for a message whose MSH could not be read, timestamped now.
/// Like [`build_ack`] with [`Msh::unreadable`], but ERR-3 names the
/// condition of `err` (100, 101, 102 or 103) rather than the catch-all 207.
pub fn build_reject(err: &Hl7Error, control_id: &str) -> Vec<u8> {
    build_reject_at(err, control_id, &hl7_timestamp(SystemTime::now()))
}

/// [`build_reject`] with MSH-7 = `timestamp`.
pub fn build_reject_at(err: &Hl7Error, control_id: &str, timestamp: &str) -> Vec<u8> {
    let text = err.to_string();
    write_ack(
        &Msh::unreadable(),
        AckCode::AR,
        control_id,
        Some((err.condition(), &text)),
        timestamp,
    )
}

fn write_ack(
    msh: &Msh,
    code: AckCode,
    control_id: &str,
    detail: Option<(ErrorCondition, &str)>,
    timestamp: &str,
) -> Vec<u8> {
    let version = msh.hl7_version().unwrap_or(Hl7Version::V2_5);
    let fs = msh.field_separator as char;
    let cs = msh.separator(0, b'^') as char;
    let message_type = if msh.trigger_event.is_empty() {
        "ACK".to_owned()
    } else if version < Hl7Version::V2_3_1 {
        format!("ACK{cs}{}", msh.trigger_event)
    } else {
        format!("ACK{cs}{}{cs}ACK", msh.trigger_event)
    };
    let msh_fields = [
        msh.encoding_characters.as_str(),
        &msh.receiving_application,
        &msh.receiving_facility,
        &msh.sending_application,
        &msh.sending_facility,
        timestamp,
        "",
        &message_type,
        &escape(msh, control_id),
        &msh.processing_id,
        &msh.version,
    ];
    let mut out = String::with_capacity(128);
    out.push_str("MSH");
    for f in msh_fields {
        out.push(fs);
        out.push_str(f);
    }
    out.push('\r');
    out.push_str("MSA");
    out.push(fs);
    out.push_str(code.as_str());
    out.push(fs);
    out.push_str(&msh.control_id);
    if let Some((_, text)) = detail
        && version < Hl7Version::V2_7
    {
        out.push(fs);
        out.push_str(&escape(msh, text));
    }
    out.push('\r');
    if let Some((condition, text)) = detail
        && version >= Hl7Version::V2_4
    {
        let severity = if code.is_accept() { "I" } else { "E" };
        let hl7_error_code = format!(
            "{}{cs}{}{cs}HL70357",
            condition.code(),
            escape(msh, condition.text())
        );
        let err_fields = [
            "",                 // ERR-1 error code and location (pre-2.5 form)
            "",                 // ERR-2 error location: not known here
            &hl7_error_code,    // ERR-3
            severity,           // ERR-4
            "",                 // ERR-5 application error code
            "",                 // ERR-6 application error parameter
            "",                 // ERR-7 diagnostic information
            &escape(msh, text), // ERR-8 user message
        ];
        out.push_str("ERR");
        for f in err_fields {
            out.push(fs);
            out.push_str(f);
        }
        out.push('\r');
    }
    out.into_bytes()
}

/// Reads MSA-1 and MSA-2 from an ACK.
pub fn parse_ack(message: &[u8]) -> Result<(AckCode, String), Hl7Error> {
    let msh = Msh::parse(message)?;
    let fs = msh.field_separator;
    let msa = message
        .split(|&b| b == b'\r' || b == b'\n')
        .find(|seg| seg.len() >= 4 && &seg[..3] == b"MSA" && seg[3] == fs)
        .ok_or(Hl7Error::MissingSegment { segment: "MSA" })?;
    let mut fields = msa.split(|&b| b == fs).skip(1);
    let code = String::from_utf8_lossy(fields.next().unwrap_or_default());
    if code.is_empty() {
        return Err(Hl7Error::MissingField { field: "MSA-1" });
    }
    let code: AckCode = code.parse()?;
    let acked = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    Ok((code, acked))
}

/// Escapes separators in free text per HL7 (`\F\`, `\S\`, `\R\`, `\T\`, `\E\`).
fn escape(msh: &Msh, text: &str) -> String {
    let fs = msh.field_separator as char;
    let cs = msh.separator(0, b'^') as char;
    let rs = msh.separator(1, b'~') as char;
    let es = msh.separator(2, b'\\') as char;
    let ss = msh.separator(3, b'&') as char;
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let code = if c == fs {
            Some('F')
        } else if c == cs {
            Some('S')
        } else if c == rs {
            Some('R')
        } else if c == es {
            Some('E')
        } else if c == ss {
            Some('T')
        } else {
            None
        };
        match code {
            Some(code) => {
                out.push(es);
                out.push(code);
                out.push(es);
            }
            // A segment terminator inside a field would split the ACK.
            None if c == '\r' || c == '\n' => out.push(' '),
            None => out.push(c),
        }
    }
    out
}

/// `YYYYMMDDHHMMSS` in UTC, computed without a calendar crate.
pub fn hl7_timestamp(at: SystemTime) -> String {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), after
/// Howard Hinnant's well-known `civil_from_days` algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const ADT: &[u8] = b"MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000||ADT^A01^ADT_A01|MSG0001|P|2.5.1\rEVN|A01|20240101120000\rPID|1||12345^^^H^MR||DOE^JANE\r";

    #[test]
    fn parses_msh_fields() {
        let msh = Msh::parse(ADT).expect("parse");
        assert_eq!(msh.field_separator, b'|');
        assert_eq!(msh.encoding_characters, "^~\\&");
        assert_eq!(msh.sending_application, "SENDAPP");
        assert_eq!(msh.sending_facility, "SENDFAC");
        assert_eq!(msh.receiving_application, "RECVAPP");
        assert_eq!(msh.receiving_facility, "RECVFAC");
        assert_eq!(msh.message_code, "ADT");
        assert_eq!(msh.trigger_event, "A01");
        assert_eq!(msh.control_id, "MSG0001");
        assert_eq!(msh.processing_id, "P");
        assert_eq!(msh.version, "2.5.1");
    }

    #[test]
    fn parses_unusual_separators_and_short_msh() {
        let msg = b"MSH#$~\\&#A#B#C#D#ts##ORU$R01#42\nOBX#1";
        let msh = Msh::parse(msg).expect("parse");
        assert_eq!(msh.field_separator, b'#');
        assert_eq!(msh.message_code, "ORU");
        assert_eq!(msh.trigger_event, "R01");
        assert_eq!(msh.control_id, "42");
        assert_eq!(msh.processing_id, "");
        assert_eq!(msh.version, "");
    }

    #[test]
    fn rejects_broken_msh() {
        assert_eq!(Msh::parse(b"PID|1|2|3|4|5"), Err(Hl7Error::NotMsh));
        assert_eq!(Msh::parse(b"MSH"), Err(Hl7Error::NotMsh));
        assert_eq!(Msh::parse(b"MSHA^~\\&A"), Err(Hl7Error::BadSeparators));
        for bad in [
            &b"MSH|^APP|A|B|C|D|ts||ADT^A01|1\r"[..], // letters as separators
            b"MSH|^~^&|A|B|C|D|ts||ADT^A01|1\r",      // a separator twice
            b"MSH|| ~\\&|A|B|C|D|ts||ADT^A01|1\r",    // empty MSH-2
            b"MSH|^ \\&|A|B|C|D|ts||ADT^A01|1\r",     // a space
            b"MSH\xa6^~\\&\xa6A\xa6B\xa6C\xa6D\xa6ts\xa6\xa6ADT^A01\xa61\r", // not ASCII
        ] {
            assert_eq!(
                Msh::parse(bad),
                Err(Hl7Error::BadSeparators),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            Msh::parse(b"MSH|^~\\&|A|B|C|D|ts||ADT^A01|\r"),
            Err(Hl7Error::MissingField { field: "MSH-10" })
        );
        assert_eq!(
            Msh::parse(b"MSH|^~\\&|A|B|C|D|ts|||1\r"),
            Err(Hl7Error::MissingField { field: "MSH-9" })
        );
    }

    #[test]
    fn ack_swaps_parties_and_echoes_control_id() {
        let msh = Msh::parse(ADT).expect("parse");
        let ack = build_ack_at(&msh, AckCode::AA, "ACK1", None, "20240102030405");
        assert_eq!(
            String::from_utf8(ack.clone()).expect("utf8"),
            "MSH|^~\\&|RECVAPP|RECVFAC|SENDAPP|SENDFAC|20240102030405||ACK^A01^ACK|ACK1|P|2.5.1\rMSA|AA|MSG0001\r"
        );
        assert_eq!(parse_ack(&ack), Ok((AckCode::AA, "MSG0001".to_owned())));
        let reply = Msh::parse(&ack).expect("ack msh");
        assert_eq!(reply.sending_application, msh.receiving_application);
        assert_eq!(reply.receiving_facility, msh.sending_facility);
        assert_eq!(reply.control_id, "ACK1");
    }

    #[test]
    fn ack_text_is_escaped() {
        let msh = Msh::parse(ADT).expect("parse");
        let ack = build_ack_at(&msh, AckCode::AE, "X", Some("a|b^c\rd"), "t");
        let text = String::from_utf8(ack.clone()).expect("utf8");
        assert!(
            text.ends_with(
                "MSA|AE|MSG0001|a\\F\\b\\S\\c d\r\
                 ERR|||207^Application internal error^HL70357|E||||a\\F\\b\\S\\c d\r"
            ),
            "{text}"
        );
        assert_eq!(parse_ack(&ack), Ok((AckCode::AE, "MSG0001".to_owned())));
    }

    #[test]
    fn ack_keeps_inbound_separators() {
        let msh = Msh::parse(b"MSH#$~\\&#A#B#C#D#ts##ORU$R01#42#T#2.3").expect("parse");
        let ack = build_ack_at(&msh, AckCode::AR, "9", None, "ts");
        assert_eq!(
            String::from_utf8(ack.clone()).expect("utf8"),
            "MSH#$~\\&#C#D#A#B#ts##ACK$R01#9#T#2.3\rMSA#AR#42\r"
        );
        assert_eq!(parse_ack(&ack), Ok((AckCode::AR, "42".to_owned())));
    }

    /// An ADT^A01 from SENDAPP with MSH-12 = `version`.
    fn adt(version: &str) -> Msh {
        let msg = format!(
            "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000||ADT^A01|MSG7|P|{version}\rPID|1\r"
        );
        Msh::parse(msg.as_bytes()).expect("parse")
    }

    fn ack_text(msh: &Msh, code: AckCode, text: Option<&str>) -> String {
        let ack = build_ack_at(msh, code, "ACK9", text, "20240102030405");
        assert_eq!(
            parse_ack(&ack),
            Ok((code, "MSG7".to_owned())),
            "parse_ack reads the ack for {}",
            msh.version
        );
        String::from_utf8(ack).expect("utf8")
    }

    const ACK_MSH: &str = "MSH|^~\\&|RECVAPP|RECVFAC|SENDAPP|SENDFAC|20240102030405||";

    #[test]
    fn ack_v2_3_has_no_structure_and_text_in_msa_3() {
        let msh = adt("2.3");
        assert_eq!(
            ack_text(&msh, AckCode::AA, None),
            format!("{ACK_MSH}ACK^A01|ACK9|P|2.3\rMSA|AA|MSG7\r")
        );
        assert_eq!(
            ack_text(&msh, AckCode::AE, Some("no route|x")),
            format!("{ACK_MSH}ACK^A01|ACK9|P|2.3\rMSA|AE|MSG7|no route\\F\\x\r")
        );
    }

    #[test]
    fn ack_v2_3_1_has_structure_and_text_in_msa_3() {
        let msh = adt("2.3.1");
        assert_eq!(
            ack_text(&msh, AckCode::AA, None),
            format!("{ACK_MSH}ACK^A01^ACK|ACK9|P|2.3.1\rMSA|AA|MSG7\r")
        );
        assert_eq!(
            ack_text(&msh, AckCode::AE, Some("no route")),
            format!("{ACK_MSH}ACK^A01^ACK|ACK9|P|2.3.1\rMSA|AE|MSG7|no route\r")
        );
    }

    #[test]
    fn ack_v2_5_adds_err_segment() {
        for version in ["2.5", "2.5.1"] {
            let msh = adt(version);
            assert_eq!(
                ack_text(&msh, AckCode::AA, None),
                format!("{ACK_MSH}ACK^A01^ACK|ACK9|P|{version}\rMSA|AA|MSG7\r")
            );
            assert_eq!(
                ack_text(&msh, AckCode::AE, Some("no route^x")),
                format!(
                    "{ACK_MSH}ACK^A01^ACK|ACK9|P|{version}\rMSA|AE|MSG7|no route\\S\\x\r\
                     ERR|||207^Application internal error^HL70357|E||||no route\\S\\x\r"
                )
            );
        }
    }

    #[test]
    fn ack_v2_8_drops_withdrawn_msa_3() {
        let msh = adt("2.8");
        assert_eq!(
            ack_text(&msh, AckCode::AR, Some("bad")),
            format!(
                "{ACK_MSH}ACK^A01^ACK|ACK9|P|2.8\rMSA|AR|MSG7\r\
                 ERR|||207^Application internal error^HL70357|E||||bad\r"
            )
        );
    }

    #[test]
    fn ack_note_on_accept_has_information_severity() {
        let msh = adt("2.5");
        assert!(
            ack_text(&msh, AckCode::AA, Some("late"))
                .ends_with("MSA|AA|MSG7|late\rERR|||0^Message accepted^HL70357|I||||late\r")
        );
    }

    #[test]
    fn ack_with_unknown_version_takes_the_v2_5_form() {
        for version in ["", "x", "2", "2.x", "2.5.1.9"] {
            let msh = adt(version);
            assert_eq!(msh.hl7_version(), None, "{version:?}");
            assert_eq!(
                ack_text(&msh, AckCode::AE, Some("t")),
                format!(
                    "{ACK_MSH}ACK^A01^ACK|ACK9|P|{version}\rMSA|AE|MSG7|t\r\
                     ERR|||207^Application internal error^HL70357|E||||t\r"
                )
            );
        }
    }

    #[test]
    fn ack_reads_version_from_composite_msh_12() {
        let msh = adt("2.3^DEU&&ISO3166");
        assert_eq!(msh.hl7_version(), Some(Hl7Version::new(2, 3, 0)));
        assert_eq!(
            ack_text(&msh, AckCode::AA, None),
            format!("{ACK_MSH}ACK^A01|ACK9|P|2.3^DEU&&ISO3166\rMSA|AA|MSG7\r")
        );
    }

    #[test]
    fn versions_compare_numerically() {
        let parse = |s: &str| Hl7Version::parse(s, '^').expect(s);
        let ordered = ["2.1", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.8", "2.10"];
        for pair in ordered.windows(2) {
            assert!(parse(pair[0]) < parse(pair[1]), "{pair:?}");
        }
        assert_eq!(parse(" 2.5 "), Hl7Version::V2_5);
        assert_eq!(parse("2.5^x").to_string(), "2.5");
        assert_eq!(parse("2.3.1").to_string(), "2.3.1");
        for bad in [
            "", "2", "2.", ".5", "2.5.", "v2.5", "2.-1", "2.5.1.0", "99999.1",
        ] {
            assert_eq!(Hl7Version::parse(bad, '^'), None, "{bad:?}");
        }
    }

    #[test]
    fn reject_names_the_parse_error_condition() {
        let cases = [
            (Hl7Error::NotMsh, "100^Segment sequence error"),
            (Hl7Error::BadSeparators, "102^Data type error"),
            (
                Hl7Error::MissingField { field: "MSH-10" },
                "101^Required field missing",
            ),
        ];
        for (err, condition) in cases {
            let ack = build_reject_at(&err, "R1", "ts");
            assert_eq!(parse_ack(&ack), Ok((AckCode::AR, String::new())));
            let text = String::from_utf8(ack).expect("utf8");
            let reason = err.to_string();
            assert_eq!(
                text,
                format!(
                    "MSH|^~\\&|||||ts||ACK|R1|P|2.5\rMSA|AR||{reason}\r\
                     ERR|||{condition}^HL70357|E||||{reason}\r"
                )
            );
        }
    }

    #[test]
    fn ack_for_unreadable_message_parses() {
        let ack = build_ack_at(&Msh::unreadable(), AckCode::AR, "1", Some("bad"), "ts");
        assert_eq!(parse_ack(&ack), Ok((AckCode::AR, String::new())));
    }

    #[test]
    fn parse_ack_errors() {
        assert_eq!(
            parse_ack(b"MSH|^~\\&|A|B|C|D|ts||ACK|1|P|2.5\r"),
            Err(Hl7Error::MissingSegment { segment: "MSA" })
        );
        assert_eq!(
            parse_ack(b"MSH|^~\\&|A|B|C|D|ts||ACK|1|P|2.5\rMSA|ZZ|1\r"),
            Err(Hl7Error::UnknownAckCode {
                code: "ZZ".to_owned()
            })
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(hl7_timestamp(UNIX_EPOCH), "19700101000000");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723); // 2000-02-29 01:02:03
        assert_eq!(hl7_timestamp(t), "20000229010203");
        let t = UNIX_EPOCH + Duration::from_secs(1_735_689_599); // 2024-12-31 23:59:59
        assert_eq!(hl7_timestamp(t), "20241231235959");
    }
}
