//! `--stop TEXT`: ends generation at the first occurrence of any stop text,
//! which is never printed. Text that might be the start of a stop text is
//! held back only as long as it still might be.

pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What to print after feeding a piece of text.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched {
    /// Print this (possibly empty) text and go on.
    Continue(String),
    /// Print this text, then stop: a stop text was found right after it.
    Stop(String),
}

impl Matched {
    /// The text to print, and whether generation stops after it.
    pub fn into_parts(self) -> (String, bool) {
        match self {
            Matched::Continue(text) => (text, false),
            Matched::Stop(text) => (text, true),
        }
    }
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Matched {
        if self.stops.is_empty() {
            return Matched::Continue(text.to_string());
        }
        self.pending.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return Matched::Stop(out);
        }
        // Hold the longest tail that is a proper prefix of some stop text.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| self.pending.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        Matched::Continue(out)
    }

    /// Text held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_across_pieces_and_hides_the_stop_text() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("hello E"), Matched::Continue("hello ".into()));
        assert_eq!(m.push("N"), Matched::Continue(String::new()));
        assert_eq!(m.push("Dx"), Matched::Stop(String::new()));
    }

    #[test]
    fn releases_a_false_start() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("E"), Matched::Continue(String::new()));
        assert_eq!(m.push("X"), Matched::Continue("EX".into()));
        assert_eq!(m.push("EN"), Matched::Continue(String::new()));
        assert_eq!(m.finish(), "EN");
    }

    #[test]
    fn no_stops_passes_through() {
        let mut m = StopMatcher::new(&[]);
        assert_eq!(m.push("E"), Matched::Continue("E".into()));
    }
}
