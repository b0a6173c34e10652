//! An independent HL7 client (python-hl7's MLLP client) through the load
//! balancer: the ACK it gets back is well formed.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::harness::Dev;

/// The Python with the `hl7` package: `$GRU_TEST_PYTHON`, else the project's
/// `.venv` that `scripts/test` makes.
fn python() -> PathBuf {
    let p = std::env::var_os("GRU_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")
        });
    assert!(
        p.exists(),
        "{} not found: these tests need Python with the `hl7` package; run ./scripts/test, which installs it into .venv",
        p.display()
    );
    p
}

const SCRIPT: &str = r#"
import sys, hl7
from hl7.client import MLLPClient
host, port = sys.argv[1], int(sys.argv[2])
msg = "\r".join([
    "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20261125031500||ADT^A01^ADT_A01|INTEROP-0001|P|2.5",
    "EVN|A01|20261125031500",
    "PID|1||12345^^^HOSP^MR||DOE^JANE||19800101|F",
])
with MLLPClient(host, port) as client:
    raw = client.send_message(msg)
ack = hl7.parse(raw.decode() if isinstance(raw, bytes) else raw)
msh, msa = ack.segment("MSH"), ack.segment("MSA")
print("MSA-1", msa[1])
print("MSA-2", msa[2])
print("MSH-3", msh[3])
print("MSH-5", msh[5])
print("MSH-9", msh[9])
"#;

#[test]
fn python_hl7_client_gets_a_well_formed_ack_through_the_load_balancer() {
    let dev = Dev::start(&["--min", "1", "--max", "1"]);
    dev.wait_in_service(1, Duration::from_secs(30));
    let out = Command::new(python())
        .args([
            "-c",
            SCRIPT,
            &dev.load_balancer.ip().to_string(),
            &dev.load_balancer.port().to_string(),
        ])
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing in {stdout}"))
            .to_owned()
    };
    assert_eq!(field("MSA-1"), "AA");
    assert_eq!(field("MSA-2"), "INTEROP-0001");
    assert_eq!(field("MSH-3"), "RECVAPP", "sender and receiver swapped");
    assert_eq!(field("MSH-5"), "SENDAPP", "sender and receiver swapped");
    assert_eq!(field("MSH-9"), "ACK^A01^ACK");
    dev.stop();
}
