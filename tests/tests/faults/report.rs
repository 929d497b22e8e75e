//! What each scenario reports: a table of its counts, printed when it ends and, with
//! `OVERLAY_FAULTS_REPORT=FILE`, appended to FILE as Markdown (`make faults` writes
//! target/faults.md; docs/reliability.md holds a real run). Counts and durations are
//! reported, never asserted on: assertions are the scenario's own.

use std::fmt::Display;
use std::io::Write;
use std::time::Instant;

/// The counts of one scenario, printed as a table when it ends.
pub struct Summary {
    title: String,
    started: Instant,
    rows: Vec<(String, String)>,
}

impl Summary {
    pub fn new(title: &str) -> Summary {
        Summary {
            title: title.to_string(),
            started: Instant::now(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, what: &str, value: impl Display) {
        self.rows.push((what.to_string(), value.to_string()));
    }

    pub fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n| | |\n|---|---|\n", self.title);
        for (what, value) in &self.rows {
            s += &format!("| {what} | {value} |\n");
        }
        s += &format!(
            "| scenario wall time | {:.0} s |\n",
            self.started.elapsed().as_secs_f64()
        );
        s
    }

    /// Prints the table, and appends it to `$OVERLAY_FAULTS_REPORT` when set.
    pub fn finish(&self) {
        let table = self.markdown();
        println!("\n{table}");
        if let Some(path) = std::env::var_os("OVERLAY_FAULTS_REPORT") {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .expect("OVERLAY_FAULTS_REPORT is writable");
            writeln!(f, "{table}").expect("write the report");
        }
    }
}
