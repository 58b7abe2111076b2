//! The short fuzz run CI does: every target, 1500 mutants each (plus its seeds, which must
//! read cleanly), with no panic, no over-allocation and no slow execution.
use std::process::Command;

#[test]
fn every_reader_survives_a_short_run() {
    let findings = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_knobs-fuzz"))
        .args(["--execs", "1500", "--json", "--findings", findings.path().to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "findings:\n{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let reports: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let targets: Vec<&serde_json::Value> = reports.iter().filter(|r| r.get("target").is_some()).collect();
    assert!(targets.len() >= 17, "{stdout}");
    for r in targets {
        assert!(r["executions"].as_u64().unwrap() >= 1500, "{r}");
        assert_eq!((r["panics"].as_u64(), r["over_allocations"].as_u64(), r["slow"].as_u64()), (Some(0), Some(0), Some(0)), "{r}");
        // Mutants must reach both outcomes: some still read, most are refused with an error.
        assert!(r["ok"].as_u64().unwrap() > 0 && r["errors"].as_u64().unwrap() > 0, "{r}");
    }
}
