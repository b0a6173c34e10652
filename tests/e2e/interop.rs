//! An independent HL7 client (python-hl7's MLLP client and its `mllp_send`
//! tool) against the load balancer and against the engine itself: the ACKs
//! it gets back are well formed and what it sent arrives.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::harness::{Dev, Sink, bench_engine};

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

/// python-hl7's `mllp_send` command, installed beside the Python above.
fn mllp_send() -> PathBuf {
    let p = python().with_file_name("mllp_send");
    assert!(
        p.exists(),
        "{} not found: it comes with the `hl7` package that ./scripts/test installs",
        p.display()
    );
    p
}

#[test]
fn mllp_send_gets_an_ack_for_each_message_from_the_engine_and_the_sink_gets_them_all() {
    let sink = Sink::start();
    let downstream = sink.addr.to_string();
    let (_engine, addr, _out) = bench_engine(&["--downstream", &downstream]);
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    // --loose reads a file with one segment per line, as operators keep
    // sample messages; three versions and three message types.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("messages.hl7");
    let messages = [
        "MSH|^~\\&|LAB|NORTH|GRU|GRU|20261125080000||ORU^R01|SEND-23|P|2.3\nPID|1||555^^^NORTH^MR||ROE^RICHARD\nOBR|1|9|9|GLU^GLUCOSE\nOBX|1|NM|GLU^GLUCOSE||98|mg/dL|||||F",
        "MSH|^~\\&|ADT|SOUTH|GRU|GRU|20261125080100||ADT^A08^ADT_A01|SEND-251|P|2.5.1\nEVN|A08|20261125080100\nPID|1||777^^^SOUTH^MR||DOE^JOHN",
        "MSH|^~\\&|ADT|EAST|GRU|GRU|20261125080200||ADT^A01^ADT_A01|SEND-25|P|2.5\nEVN|A01|20261125080200\nPID|1||888^^^EAST^MR||POE^ANNA",
    ];
    std::fs::write(&file, messages.join("\n") + "\n").expect("write messages");
    let out = Command::new(mllp_send())
        .arg("--loose")
        .arg("--file")
        .arg(&file)
        .args(["--port", port, host])
        .output()
        .expect("run mllp_send");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mllp_send failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It prints each ACK as it comes back, segments separated by CR.
    let acks: Vec<&str> = stdout
        .split(['\r', '\n'])
        .filter(|seg| seg.starts_with("MSA|"))
        .collect();
    assert_eq!(
        acks,
        ["MSA|AA|SEND-23", "MSA|AA|SEND-251", "MSA|AA|SEND-25"],
        "{stdout:?}"
    );
    let received = sink.stop();
    for id in ["SEND-23", "SEND-251", "SEND-25"] {
        assert!(received.contains(id), "{id} not at the sink: {received:?}");
    }
}
