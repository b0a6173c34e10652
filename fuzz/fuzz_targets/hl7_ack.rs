//! Reads arbitrary bytes as an HL7 message. Whenever `Msh::parse` accepts
//! them, the ACKs built for it (AA without text, AE with a hostile text)
//! must read back with `parse_ack` as the same code with MSA-2 = the inbound
//! MSH-10, and their own MSH must parse. Nothing may panic.
#![no_main]

use gru_engine::hl7::{AckCode, Msh, build_ack_at, parse_ack};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msh) = Msh::parse(data) else {
        return;
    };
    // The input itself as the text: every separator, CR and LF it holds
    // must be escaped for the ACK to stay readable.
    let text = String::from_utf8_lossy(data);
    for (code, text) in [(AckCode::AA, None), (AckCode::AE, Some(&*text))] {
        let ack = build_ack_at(&msh, code, "ACK1", text, "20240101000000");
        assert_eq!(
            parse_ack(&ack),
            Ok((code, msh.control_id.clone())),
            "ack {:?}",
            String::from_utf8_lossy(&ack)
        );
        let reply = Msh::parse(&ack).expect("the ack's msh parses");
        assert_eq!(reply.version, msh.version, "msh-12 is echoed");
        assert_eq!(reply.control_id, "ACK1");
        assert_eq!(ack.last(), Some(&b'\r'), "the ack ends with a segment end");
    }
});
