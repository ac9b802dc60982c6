//! How far `edgelm convert` is, on stderr: a bar redrawn in place when stderr is a terminal,
//! otherwise a plain line at every tenth (logs and pipes get no carriage returns); then one
//! closing line with what was written and how long it took.

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Where the report goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Off,
    Bar,
    Lines,
}

/// Steps done out of a known total.
pub struct Progress {
    done: usize,
    total: usize,
    mode: Mode,
    started: Instant,
}

const WIDTH: usize = 40;

impl Progress {
    /// `total` steps; nothing is printed unless `enabled`.
    pub fn new(total: usize, enabled: bool) -> Progress {
        let mode = match (enabled, std::io::stderr().is_terminal()) {
            (false, _) => Mode::Off,
            (true, true) => Mode::Bar,
            (true, false) => Mode::Lines,
        };
        Progress {
            done: 0,
            total: total.max(1),
            mode,
            started: Instant::now(),
        }
    }

    /// One more step done.
    pub fn tick(&mut self) {
        let before = self.done * 10 / self.total;
        self.done = (self.done + 1).min(self.total);
        if let Some(text) = self.render(before) {
            let mut err = std::io::stderr().lock();
            // Progress is best effort: a closed stderr must not fail the conversion.
            let _ = err.write_all(text.as_bytes());
            let _ = err.flush();
        }
    }

    /// The text one step prints, given the tenth reached before it.
    fn render(&self, tenth_before: usize) -> Option<String> {
        let secs = self.started.elapsed().as_secs_f64();
        match self.mode {
            Mode::Off => None,
            Mode::Bar => {
                let filled = self.done * WIDTH / self.total;
                Some(format!(
                    "\rconverting [{}{}] {}/{} {secs:.1} s",
                    "#".repeat(filled),
                    " ".repeat(WIDTH - filled),
                    self.done,
                    self.total
                ))
            }
            Mode::Lines if self.done * 10 / self.total > tenth_before => Some(format!(
                "converting: {}% ({}/{}, {secs:.1} s)\n",
                self.done * 100 / self.total,
                self.done,
                self.total
            )),
            Mode::Lines => None,
        }
    }

    /// Ends the report with `summary` and the time taken.
    pub fn finish(&mut self, summary: &str) {
        let secs = self.started.elapsed().as_secs_f64();
        let end = match self.mode {
            Mode::Off => return,
            Mode::Bar => "\n",
            Mode::Lines => "",
        };
        eprintln!("{end}converted in {secs:.1} s: {summary}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(mode: Mode, total: usize) -> Vec<String> {
        let mut p = Progress {
            done: 0,
            total,
            mode,
            started: Instant::now(),
        };
        let mut out = vec![];
        for _ in 0..total {
            let before = p.done * 10 / p.total;
            p.done += 1;
            out.extend(p.render(before));
        }
        out
    }

    #[test]
    fn plain_lines_come_at_each_tenth() {
        let lines = steps(Mode::Lines, 18);
        let percents: Vec<&str> = lines
            .iter()
            .map(|l| l.split('%').next().unwrap_or_default())
            .collect();
        assert_eq!(
            percents,
            [
                "converting: 11",
                "converting: 22",
                "converting: 33",
                "converting: 44",
                "converting: 50",
                "converting: 61",
                "converting: 72",
                "converting: 83",
                "converting: 94",
                "converting: 100"
            ]
        );
        assert!(lines.iter().all(|l| l.ends_with(" s)\n")));
    }

    #[test]
    fn the_bar_redraws_every_step_in_place() {
        let bars = steps(Mode::Bar, 4);
        assert_eq!(bars.len(), 4);
        assert!(bars[1].starts_with(&format!(
            "\rconverting [{}{}] 2/4 ",
            "#".repeat(20),
            " ".repeat(20)
        )));
        assert!(steps(Mode::Off, 4).is_empty());
    }
}
