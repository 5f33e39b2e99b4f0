//! What the model thread runs next, and what happens when it dies: a pure queue with four
//! lanes and two dropping rules, and a supervisor loop. No models, no channels, no egui here,
//! so every rule is tested below.
//!
//! Lanes, served in this order (first in, first out within a lane):
//! 1. **control**: loading a model, switching project: quick, and what follows depends on it;
//! 2. **interactive**: a SAM click, the probability map of the image on screen;
//! 3. **jobs**: fine-tuning, mining, "Encode all" (long; each yields to the interactive lane
//!    between images or batches, see [`Scheduler::pop_interactive`]);
//! 4. **prefetch**: encoding the image on screen ahead of the first click.
//!
//! Dropping rules (the only ways a command leaves the queue without running; `push` returns
//! what it dropped so the thread can log it):
//! - **superseded click**: a SAM click replaces a queued click for the same image (each click
//!   carries the whole prompt so far, so the newer one says everything the older one did);
//!   a queued probability request for the same image is replaced the same way;
//! - **stale**: image-keyed work (clicks, probability maps, prefetches) for an image other
//!   than the newest one the user looked at (the *focus*) is dropped: its answer would be
//!   thrown away by the UI anyway.
//!
//! Control and job commands are never dropped and never reordered among themselves.
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Where a command waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Control,
    Interactive,
    Job,
    Prefetch,
}

/// What the scheduler needs to know about a command.
pub trait Schedule {
    fn lane(&self) -> Lane;
    /// The image an interactive or prefetch command is for (its key for the dropping rules).
    fn image(&self) -> Option<&str>;
    /// A SAM click (coalesced with a queued click for the same image).
    fn is_click(&self) -> bool;
}

/// The model thread's queue (see the module doc).
#[derive(Debug)]
pub struct Scheduler<T> {
    control: VecDeque<T>,
    interactive: VecDeque<T>,
    jobs: VecDeque<T>,
    prefetch: VecDeque<T>,
    /// The image the newest image-keyed command was for.
    focus: Option<String>,
}

impl<T> Default for Scheduler<T> {
    fn default() -> Self {
        Self {
            control: VecDeque::new(),
            interactive: VecDeque::new(),
            jobs: VecDeque::new(),
            prefetch: VecDeque::new(),
            focus: None,
        }
    }
}

impl<T: Schedule> Scheduler<T> {
    /// Queues `cmd`; returns the commands it made obsolete (superseded or stale).
    pub fn push(&mut self, cmd: T) -> Vec<T> {
        let mut dropped = Vec::new();
        if let Some(image) = cmd.image() {
            if self.focus.as_deref() != Some(image) {
                self.focus = Some(image.to_string());
                for lane in [&mut self.interactive, &mut self.prefetch] {
                    dropped.extend(drain_where(lane, |c| c.image() != Some(image)));
                }
            }
        }
        match cmd.lane() {
            Lane::Control => self.control.push_back(cmd),
            Lane::Job => self.jobs.push_back(cmd),
            Lane::Prefetch => {
                dropped.extend(drain_where(&mut self.prefetch, |c| {
                    c.image() == cmd.image()
                }));
                self.prefetch.push_back(cmd);
            }
            Lane::Interactive => {
                let (click, image) = (cmd.is_click(), cmd.image());
                dropped.extend(drain_where(&mut self.interactive, |c| {
                    c.is_click() == click && c.image() == image
                }));
                self.interactive.push_back(cmd);
            }
        }
        dropped
    }

    /// The next command to run.
    pub fn pop(&mut self) -> Option<T> {
        self.control
            .pop_front()
            .or_else(|| self.interactive.pop_front())
            .or_else(|| self.jobs.pop_front())
            .or_else(|| self.prefetch.pop_front())
    }

    /// The next interactive command, if any: what a running job serves between two images.
    pub fn pop_interactive(&mut self) -> Option<T> {
        self.interactive.pop_front()
    }

    pub fn len(&self) -> usize {
        self.control.len() + self.interactive.len() + self.jobs.len() + self.prefetch.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes and returns the commands of `lane` that match, keeping the others in order.
fn drain_where<T>(lane: &mut VecDeque<T>, mut f: impl FnMut(&T) -> bool) -> Vec<T> {
    let mut out = Vec::new();
    let mut keep = VecDeque::with_capacity(lane.len());
    for c in lane.drain(..) {
        if f(&c) {
            out.push(c);
        } else {
            keep.push_back(c);
        }
    }
    *lane = keep;
    out
}

/// The text of a panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `run` on a state from `fresh` until it returns; when it panics, `died` hears why and
/// it runs again on a fresh state (the models are gone; the `inbox` with its queued commands
/// survives). Returns how many times it was restarted.
pub fn supervise<I, S>(
    inbox: &mut I,
    mut fresh: impl FnMut() -> S,
    mut run: impl FnMut(&mut S, &mut I),
    mut died: impl FnMut(String),
) -> usize {
    let mut restarts = 0;
    loop {
        let mut state = fresh();
        match catch_unwind(AssertUnwindSafe(|| run(&mut state, inbox))) {
            Ok(()) => return restarts,
            Err(p) => {
                restarts += 1;
                died(panic_message(p.as_ref()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    enum C {
        Load(u32),
        Click(&'static str, u32),
        Prob(&'static str),
        Job(u32),
        Embed(&'static str),
    }

    impl Schedule for C {
        fn lane(&self) -> Lane {
            match self {
                C::Load(_) => Lane::Control,
                C::Click(..) | C::Prob(_) => Lane::Interactive,
                C::Job(_) => Lane::Job,
                C::Embed(_) => Lane::Prefetch,
            }
        }
        fn image(&self) -> Option<&str> {
            match self {
                C::Click(i, _) | C::Prob(i) | C::Embed(i) => Some(i),
                _ => None,
            }
        }
        fn is_click(&self) -> bool {
            matches!(self, C::Click(..))
        }
    }

    fn drain(s: &mut Scheduler<C>) -> Vec<C> {
        std::iter::from_fn(|| s.pop()).collect()
    }

    #[test]
    fn a_command_between_two_clicks_is_kept() {
        // the old loop dropped the job between two clicks
        let mut s = Scheduler::default();
        assert!(s.push(C::Click("a", 1)).is_empty());
        assert!(s.push(C::Job(1)).is_empty());
        assert_eq!(s.push(C::Click("a", 2)), vec![C::Click("a", 1)]);
        assert_eq!(drain(&mut s), vec![C::Click("a", 2), C::Job(1)]);
    }

    #[test]
    fn lanes_are_served_in_order_and_fifo_within() {
        let mut s = Scheduler::default();
        for c in [
            C::Embed("a"),
            C::Job(1),
            C::Load(1),
            C::Prob("a"),
            C::Job(2),
            C::Click("a", 1),
            C::Load(2),
        ] {
            assert!(s.push(c).is_empty());
        }
        assert_eq!(s.len(), 7);
        assert_eq!(
            drain(&mut s),
            vec![
                C::Load(1),
                C::Load(2),
                C::Prob("a"),
                C::Click("a", 1),
                C::Job(1),
                C::Job(2),
                C::Embed("a"),
            ]
        );
        assert!(s.is_empty());
    }

    #[test]
    fn leaving_an_image_drops_its_prefetch_and_clicks_but_no_job() {
        let mut s = Scheduler::default();
        s.push(C::Embed("a"));
        s.push(C::Job(1));
        s.push(C::Click("a", 1));
        s.push(C::Load(1));
        let mut dropped = s.push(C::Prob("b"));
        dropped.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(dropped, vec![C::Click("a", 1), C::Embed("a")]);
        assert!(s.push(C::Embed("b")).is_empty());
        assert_eq!(
            drain(&mut s),
            vec![C::Load(1), C::Prob("b"), C::Job(1), C::Embed("b")]
        );
    }

    #[test]
    fn repeated_requests_for_one_image_coalesce_per_kind() {
        let mut s = Scheduler::default();
        s.push(C::Click("a", 1));
        s.push(C::Prob("a"));
        assert_eq!(s.push(C::Click("a", 2)), vec![C::Click("a", 1)]);
        assert_eq!(s.push(C::Prob("a")), vec![C::Prob("a")]);
        assert_eq!(s.push(C::Embed("a")), vec![]);
        assert_eq!(s.push(C::Embed("a")), vec![C::Embed("a")]);
        assert_eq!(
            drain(&mut s),
            vec![C::Click("a", 2), C::Prob("a"), C::Embed("a")]
        );
    }

    #[test]
    fn a_job_yields_to_clicks_only() {
        let mut s = Scheduler::default();
        s.push(C::Job(2));
        s.push(C::Embed("a"));
        s.push(C::Load(1));
        assert_eq!(s.pop_interactive(), None);
        s.push(C::Click("a", 1));
        assert_eq!(s.pop_interactive(), Some(C::Click("a", 1)));
        assert_eq!(s.pop_interactive(), None);
        assert_eq!(drain(&mut s), vec![C::Load(1), C::Job(2), C::Embed("a")]);
    }

    #[test]
    fn supervise_restarts_after_a_panic_and_keeps_the_inbox() {
        let mut inbox = vec![1, 2, 3];
        let mut fresh = 0;
        let mut deaths = Vec::new();
        let restarts = supervise(
            &mut inbox,
            || {
                fresh += 1;
                fresh
            },
            |state, inbox| {
                let next = inbox.remove(0);
                if next < 3 {
                    panic!("boom {next} in state {state}");
                }
            },
            |why| deaths.push(why),
        );
        assert_eq!(restarts, 2);
        assert_eq!(fresh, 3, "each run starts from a fresh state");
        assert_eq!(deaths, vec!["boom 1 in state 1", "boom 2 in state 2"]);
        assert!(inbox.is_empty());
    }
}
