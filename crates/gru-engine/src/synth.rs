//! Seeded synthetic HL7 messages for benchmarks and tests.
//!
//! Sample messages of public origin have unclear licences, so everything here
//! is made up: names are built from invented syllables, identifiers are
//! random digits. The same seed gives the same sequence of messages.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SYLLABLES: &[&str] = &[
    "ba", "ko", "ri", "len", "mar", "tu", "sel", "vo", "din", "ha", "qua", "zel", "po", "nim",
    "tar", "eb", "ul", "fen", "gro", "wy",
];
const OBSERVATIONS: &[(&str, &str, &str)] = &[
    ("2345-7", "GLUCOSE", "mg/dL"),
    ("718-7", "HEMOGLOBIN", "g/dL"),
    ("2951-2", "SODIUM", "mmol/L"),
    ("2823-3", "POTASSIUM", "mmol/L"),
    ("6690-2", "LEUKOCYTES", "10*3/uL"),
];
const FILLER_WORDS: &[&str] = &[
    "synthetic",
    "note",
    "patient",
    "resting",
    "stable",
    "review",
    "follow",
    "up",
    "observed",
    "routine",
    "bench",
    "filler",
    "text",
    "no",
    "change",
];
/// Longest NTE/OBX padding segment, so padding looks like many notes rather
/// than one enormous one.
const MAX_PADDING_SEGMENT: usize = 200;

/// The kinds of message produced, in rotation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Admit/visit notification.
    AdtA01,
    /// Update patient information.
    AdtA08,
    /// Unsolicited observation result.
    OruR01,
}

/// A seeded generator of synthetic messages of roughly a given size.
#[derive(Debug)]
pub struct Synth {
    rng: StdRng,
    size_bytes: usize,
    count: u64,
}

impl Synth {
    /// `size_bytes` is the approximate message size; messages are never
    /// smaller than their mandatory segments.
    pub fn new(seed: u64, size_bytes: usize) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            size_bytes,
            count: 0,
        }
    }

    /// The next message, with MSH-10 = `control_id`. Segments end with `\r`.
    pub fn message(&mut self, control_id: &str) -> Vec<u8> {
        let kind = match self.rng.random_range(0..3) {
            0 => MessageKind::AdtA01,
            1 => MessageKind::AdtA08,
            _ => MessageKind::OruR01,
        };
        self.message_of(kind, control_id)
    }

    /// The next message of the given kind.
    pub fn message_of(&mut self, kind: MessageKind, control_id: &str) -> Vec<u8> {
        self.count += 1;
        let ts = self.timestamp();
        let (code, event, structure) = match kind {
            MessageKind::AdtA01 => ("ADT", "A01", "ADT_A01"),
            MessageKind::AdtA08 => ("ADT", "A08", "ADT_A01"),
            MessageKind::OruR01 => ("ORU", "R01", "ORU_R01"),
        };
        let facility = self.rng.random_range(1..=126);
        let mut segs = vec![format!(
            "MSH|^~\\&|SYNTH|HOSP{facility:03}|GRU|GRU|{ts}||{code}^{event}^{structure}|{control_id}|P|2.5.1"
        )];
        let mrn: u64 = self.rng.random_range(10_000_000..100_000_000);
        let family = self.name();
        let given = self.name();
        let birth = format!(
            "{}{:02}{:02}",
            self.rng.random_range(1930..2020),
            self.rng.random_range(1..=12),
            self.rng.random_range(1..=28)
        );
        let sex = if self.rng.random_bool(0.5) { "F" } else { "M" };
        let street = self.name();
        let pid = format!(
            "PID|1||{mrn}^^^SYNTH^MR||{family}^{given}||{birth}|{sex}|||{}_{street} ST^^SYNTHTOWN^ZZ^{:05}",
            self.rng.random_range(1..9999),
            self.rng.random_range(0..100_000)
        );
        match kind {
            MessageKind::AdtA01 | MessageKind::AdtA08 => {
                segs.push(format!("EVN|{event}|{ts}"));
                segs.push(pid);
                let visit: u64 = self.rng.random_range(1_000_000..10_000_000);
                segs.push(format!(
                    "PV1|1|I|W{}^{}^1^HOSP{facility:03}||||{}^{}^{}|||MED||||1|||||{visit}",
                    self.rng.random_range(1..20),
                    self.rng.random_range(100..500),
                    self.rng.random_range(1000..9999),
                    self.name(),
                    self.name(),
                ));
            }
            MessageKind::OruR01 => {
                segs.push(pid);
                let order: u64 = self.rng.random_range(1_000_000..10_000_000);
                segs.push(format!(
                    "OBR|1|{order}|{order}|PANEL^SYNTHETIC PANEL|||{ts}"
                ));
                let (loinc, name, unit) =
                    OBSERVATIONS[self.rng.random_range(0..OBSERVATIONS.len())];
                let value = self.rng.random_range(1..500);
                segs.push(format!(
                    "OBX|1|NM|{loinc}^{name}^LN||{value}|{unit}|||||F|||{ts}"
                ));
            }
        }
        self.pad(kind, &mut segs);
        let mut out = segs.join("\r");
        out.push('\r');
        out.into_bytes()
    }

    fn pad(&mut self, kind: MessageKind, segs: &mut Vec<String>) {
        let mut len: usize = segs.iter().map(|s| s.len() + 1).sum();
        let mut n = 1;
        while len < self.size_bytes {
            let (prefix, suffix) = match kind {
                MessageKind::OruR01 => {
                    (format!("OBX|{}|TX|NOTE^SYNTHETIC NOTE||", n + 1), "||||||F")
                }
                _ => (format!("NTE|{n}||"), ""),
            };
            let overhead = prefix.len() + suffix.len() + 1;
            let room = (self.size_bytes - len)
                .saturating_sub(overhead)
                .clamp(1, MAX_PADDING_SEGMENT);
            let text = self.filler(room);
            let seg = format!("{prefix}{text}{suffix}");
            len += seg.len() + 1;
            segs.push(seg);
            n += 1;
        }
    }

    fn filler(&mut self, len: usize) -> String {
        let mut text = String::with_capacity(len + 12);
        while text.len() < len {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(FILLER_WORDS[self.rng.random_range(0..FILLER_WORDS.len())]);
        }
        text.truncate(len);
        text
    }

    fn name(&mut self) -> String {
        let parts = self.rng.random_range(2..=3);
        let mut name = String::new();
        for _ in 0..parts {
            name.push_str(SYLLABLES[self.rng.random_range(0..SYLLABLES.len())]);
        }
        name.to_ascii_uppercase()
    }

    /// Deterministic timestamps: a fixed day, one message per second.
    fn timestamp(&self) -> String {
        let secs = self.count % 86_400;
        format!(
            "20240115{:02}{:02}{:02}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hl7::Msh;

    #[test]
    fn same_seed_same_messages() {
        let mut a = Synth::new(7, 500);
        let mut b = Synth::new(7, 500);
        for i in 0..20 {
            let id = format!("C{i}");
            assert_eq!(a.message(&id), b.message(&id));
        }
    }

    #[test]
    fn messages_parse_and_carry_control_id() {
        let mut s = Synth::new(1, 0);
        let mut kinds = std::collections::HashSet::new();
        for i in 0..60 {
            let id = format!("ID-{i}");
            let msg = s.message(&id);
            let msh = Msh::parse(&msg).expect("msh");
            assert_eq!(msh.control_id, id);
            kinds.insert((msh.message_code.clone(), msh.trigger_event.clone()));
            assert!(msg.ends_with(b"\r"));
            assert!(!msg.contains(&0x0B) && !msg.contains(&0x1C));
        }
        assert_eq!(kinds.len(), 3, "{kinds:?}");
    }

    #[test]
    fn size_is_approximate() {
        for size in [1_000, 5_000, 64_000] {
            let mut s = Synth::new(3, size);
            for kind in [
                MessageKind::AdtA01,
                MessageKind::AdtA08,
                MessageKind::OruR01,
            ] {
                let len = s.message_of(kind, "X").len();
                assert!(len >= size && len <= size + 64, "{kind:?} {size} -> {len}");
            }
        }
    }
}
