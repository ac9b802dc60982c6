//! Stop strings over streamed text, with hold-back.
//!
//! Text arrives in pieces; a stop string may straddle several of them. The matcher emits
//! everything that can no longer be the start of a stop string and holds back the longest
//! tail that still could be, until that tail either completes a stop string (the text
//! before it is emitted, the stop string and everything after are dropped) or diverges
//! (the tail is released). Held text is at most the longest stop string minus one byte.

/// What a [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text that is safe to show now.
    pub text: String,
    /// Index (into the list given to [`StopMatcher::new`]) of the stop string that was hit.
    pub stop: Option<usize>,
}

impl StopOutcome {
    /// Whether a stop string was hit: generation should end after showing `text`.
    pub fn stopped(&self) -> bool {
        self.stop.is_some()
    }
}

/// Watches streamed text for any of a list of stop strings.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<(usize, String)>, // (index in the caller's list, non-empty stop string)
    held: String,                // tail that is a prefix of some stop string
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for these stop strings; empty strings are ignored (they would match
    /// before any text).
    pub fn new<I, S>(stops: I) -> StopMatcher
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let stops = stops
            .into_iter()
            .map(Into::into)
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .collect();
        StopMatcher {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// Feeds the next piece of text. After a stop string has been hit, everything is
    /// swallowed.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome::default();
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(text);

        // The earliest occurrence wins: the less text shown past the stop, the better.
        let hit = self
            .stops
            .iter()
            .filter_map(|(i, s)| buf.find(s.as_str()).map(|at| (at, *i)))
            .min();
        if let Some((at, i)) = hit {
            buf.truncate(at);
            self.stopped = true;
            return StopOutcome {
                text: buf,
                stop: Some(i),
            };
        }

        let keep_from = self.partial_match_start(&buf);
        self.held = buf.split_off(keep_from);
        StopOutcome {
            text: buf,
            stop: None,
        }
    }

    /// Releases held text at the end of the stream (nothing if a stop string was hit).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Start of the longest suffix of `buf` that is a proper prefix of some stop string,
    /// or `buf.len()` if there is none. Suffixes start on char boundaries; since `buf` and
    /// the stops are valid UTF-8, an equal byte run is then a whole-char prefix too.
    fn partial_match_start(&self, buf: &str) -> usize {
        let longest = self.stops.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
        let earliest = buf.len().saturating_sub(longest.saturating_sub(1));
        buf.char_indices()
            .map(|(at, _)| at)
            .filter(|&at| at >= earliest)
            .find(|&at| {
                let tail = &buf[at..];
                self.stops.iter().any(|(_, s)| s.starts_with(tail))
            })
            .unwrap_or(buf.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes pieces in order; returns everything shown (with `finish` if no stop) and the
    /// stop index.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>, Vec<String>) {
        let mut m = StopMatcher::new(stops.iter().copied());
        let mut shown = String::new();
        let mut per_push = Vec::new();
        for p in pieces {
            let out = m.push(p);
            shown.push_str(&out.text);
            per_push.push(out.text.clone());
            if let Some(i) = out.stop {
                return (shown, Some(i), per_push);
            }
        }
        shown.push_str(&m.finish());
        (shown, None, per_push)
    }

    #[test]
    fn no_stops_passes_text_through_unchanged() {
        let (shown, stop, per) = run(&[], &["Hello", ", ", "world"]);
        assert_eq!(shown, "Hello, world");
        assert_eq!(stop, None);
        assert_eq!(per, ["Hello", ", ", "world"]);
    }

    #[test]
    fn stop_inside_one_piece_cuts_before_it() {
        let (shown, stop, _) = run(&["</s>"], &["Paris.</s>junk"]);
        assert_eq!((shown.as_str(), stop), ("Paris.", Some(0)));
    }

    #[test]
    fn stop_straddling_pieces_is_held_then_dropped() {
        let (shown, stop, per) = run(&["<|im_end|>"], &["Paris.<|", "im", "_e", "nd|>\nmore"]);
        assert_eq!((shown.as_str(), stop), ("Paris.", Some(0)));
        assert_eq!(per, ["Paris.", "", "", ""]);
    }

    #[test]
    fn diverging_partial_match_is_released() {
        let (shown, stop, per) = run(&["<|im_end|>"], &["a <|", "im", " b", " c"]);
        assert_eq!((shown.as_str(), stop), ("a <|im b c", None));
        assert_eq!(per, ["a ", "", "<|im b", " c"]);
    }

    #[test]
    fn overlapping_prefix_aab_in_aaab() {
        let (shown, stop, per) = run(&["aab"], &["a", "a", "a", "b", "zzz"]);
        assert_eq!((shown.as_str(), stop), ("a", Some(0)));
        assert_eq!(per, ["", "", "a", ""]);
        let (shown, stop, _) = run(&["aab"], &["aaab"]);
        assert_eq!((shown.as_str(), stop), ("a", Some(0)));
    }

    #[test]
    fn held_text_is_released_by_finish() {
        let mut m = StopMatcher::new(["STOP"]);
        assert_eq!(m.push("end ST").text, "end ");
        assert_eq!(m.finish(), "ST");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (shown, stop, _) = run(&["cd", "bcd", "xyz"], &["abcdxyz"]);
        assert_eq!((shown.as_str(), stop), ("a", Some(1)));
        let (shown, stop, _) = run(&["\n\n", "User:"], &["Sure.", "\nUs", "er: hi"]);
        assert_eq!((shown.as_str(), stop), ("Sure.\n", Some(1)));
    }

    #[test]
    fn empty_stop_strings_are_ignored_but_keep_indices() {
        let (shown, stop, _) = run(&["", "X"], &["abXc"]);
        assert_eq!((shown.as_str(), stop), ("ab", Some(1)));
    }

    #[test]
    fn after_a_stop_everything_is_swallowed() {
        let mut m = StopMatcher::new(["!"]);
        assert!(m.push("hi!").stopped());
        assert_eq!(m.push("more"), StopOutcome::default());
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn cjk_and_emoji_stops_across_pieces() {
        let (shown, stop, per) = run(&["结束", "🛑"], &["你好", "结", "果", "结", "束了"]);
        assert_eq!((shown.as_str(), stop), ("你好结果", Some(0)));
        assert_eq!(per, ["你好", "", "结果", "", ""]);
        let (shown, stop, _) = run(&["🛑🛑"], &["ok 🛑", " 🛑", "🛑 x"]);
        assert_eq!((shown.as_str(), stop), ("ok 🛑 ", Some(0)));
        // An emoji sharing leading bytes with the stop (U+1F6D1 vs U+1F6D2) is not held.
        let (_, stop, per) = run(&["🛑"], &["a🛒", "b"]);
        assert_eq!(
            (stop, per),
            (None, vec!["a🛒".to_string(), "b".to_string()])
        );
    }
}
