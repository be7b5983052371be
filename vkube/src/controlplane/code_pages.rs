//! Gives the executable's code pages back when the cluster goes to sleep. A sleeping control
//! plane runs little of its code (the proxy's accept loop, a few timers, its host connection),
//! yet it kept mapped every page it ran while awake: about 21 of its 26 MiB resident
//! (docs/benchmarks-notes.md "Sleep mode"). Dropped, the pages stay in the page cache, shared with
//! every other vkube process (and the kernel may reclaim them), and what the process runs again
//! is mapped back on first touch, a minor fault, as any page of code is the first time.

use std::ops::Range;
use std::ptr::NonNull;

/// One mapping of /proc/self/smaps, what deciding needs of it.
#[derive(Debug, PartialEq)]
struct Mapping {
    range: Range<usize>,
    writable: bool,
    /// Device and inode: which file is mapped (inode 0: anonymous memory).
    file: (String, u64),
    rss_kib: u64,
    /// Pages of the mapping the process has its own copy of (copied on write), in memory
    /// (`Anonymous`) and in swap (`Swap`); `None` until both lines were read, so a format
    /// without them drops nothing.
    anonymous_kib: Option<u64>,
    swap_kib: Option<u64>,
}

impl Mapping {
    fn has_no_private_page(&self) -> bool {
        self.anonymous_kib == Some(0) && self.swap_kib == Some(0)
    }
}

fn mappings(smaps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = vec![];
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
        {
            let perms = fields.next().unwrap_or_default();
            let (_offset, dev, inode) = (fields.next(), fields.next().unwrap_or_default(), fields.next());
            out.push(Mapping {
                range: start..end,
                writable: perms.as_bytes().get(1) != Some(&b'-'),
                file: (dev.to_string(), inode.and_then(|i| i.parse().ok()).unwrap_or(0)),
                rss_kib: 0,
                anonymous_kib: None,
                swap_kib: None,
            });
            continue;
        }
        let (Some(m), Some(kib)) = (out.last_mut(), fields.next().and_then(|v| v.parse::<u64>().ok())) else {
            continue;
        };
        match first {
            "Rss:" => m.rss_kib = kib,
            "Anonymous:" => m.anonymous_kib = Some(kib),
            "Swap:" => m.swap_kib = Some(kib),
            _ => {}
        }
    }
    out
}

/// The mappings that can be dropped without losing a byte: those the loader made of the file
/// holding the code at `code` (our executable: the unbroken run of its mappings around that
/// address, so never a later mmap of the same file that could be unmapped and its range reused
/// meanwhile), not writable, with no page of their own (every resident page is the file's, so
/// the next touch maps the same bytes again), and resident at all.
fn droppable(smaps: &str, code: usize) -> Vec<Mapping> {
    let all = mappings(smaps);
    let Some(at) = all.iter().position(|m| m.range.contains(&code) && m.file.1 != 0) else {
        return vec![];
    };
    let same_file_next_to = |a: &Mapping, b: &Mapping| a.file == b.file && a.range.end == b.range.start;
    let mut first = at;
    while first > 0 && same_file_next_to(&all[first - 1], &all[first]) {
        first -= 1;
    }
    let mut last = at;
    while last + 1 < all.len() && same_file_next_to(&all[last], &all[last + 1]) {
        last += 1;
    }
    all.into_iter()
        .skip(first)
        .take(last - first + 1)
        .filter(|m| !m.writable && m.has_no_private_page() && m.rss_kib > 0)
        .collect()
}

/// Drops this process's resident pages of its own executable that are the file's, and returns
/// how many KiB were resident in them. Errors are the /proc read's or madvise's.
pub fn give_back() -> std::io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut kib = 0;
    for m in droppable(&smaps, give_back as fn() -> std::io::Result<u64> as usize) {
        drop_pages(&m.range)?;
        kib += m.rss_kib;
    }
    Ok(kib)
}

/// The workspace's one `unsafe` block.
#[allow(unsafe_code)]
fn drop_pages(range: &Range<usize>) -> std::io::Result<()> {
    let Some(start) = NonNull::new(range.start as *mut std::ffi::c_void) else { return Ok(()) };
    // SAFETY: `range` is a whole mapping the loader made of our own executable, read-only and
    // without a private page (`droppable`, from /proc/self/smaps read just before). These
    // mappings live as long as the process (nothing unmaps the executable's segments, so the
    // range cannot be reused by another mapping), and nothing in this process makes them
    // writable. MADV_DONTNEED on a private file mapping unmaps its pages and the next touch maps
    // the file's page again: the memory reads the same before and after, so no reference Rust
    // holds into it (code, constants) sees a change.
    unsafe { nix::sys::mman::madvise(start, range.end - range.start, nix::sys::mman::MmapAdvise::MADV_DONTNEED) }
        .map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
5653630000-5653640000 r--p 00000000 fe:00 5310615                    /opt/vkube
Rss:                2144 kB
Anonymous:             0 kB
Swap:                  0 kB
5653640000-5653650000 r-xp 0044a000 fe:00 5310615                    /opt/vkube
Rss:               18928 kB
Anonymous:             0 kB
Swap:                  0 kB
5653650000-5653660000 r--p 01a8b000 fe:00 5310615                    /opt/vkube
Rss:                 464 kB
Anonymous:           464 kB
Swap:                  0 kB
5653660000-5653670000 rw-p 01afe000 fe:00 5310615                    /opt/vkube
Rss:                  20 kB
Anonymous:            20 kB
5653670000-5653680000 r-xp 00000000 fe:00 99                         /usr/lib/libc.so.6
Rss:                1252 kB
Anonymous:             0 kB
Swap:                  0 kB
5653680000-5653690000 rw-p 00000000 00:00 0
Rss:                3096 kB
Anonymous:          3096 kB
Swap:                  0 kB
7f00000000-7f00010000 r--p 00000000 fe:00 5310615                    /opt/vkube
Rss:                  64 kB
Anonymous:             0 kB
Swap:                  0 kB
";

    #[test]
    fn only_the_executables_unmodified_read_only_mappings_are_dropped() {
        let ranges: Vec<_> = droppable(SMAPS, 0x5653641234).into_iter().map(|m| (m.range, m.rss_kib)).collect();
        // Not the relocated read-only data (its pages are private copies), not the writable data,
        // not libc's code, not the heap, and not a later mapping of the same file elsewhere
        // (say a debugger's read of its symbols), which could go away meanwhile.
        assert_eq!(ranges, [(0x5653630000..0x5653640000, 2144), (0x5653640000..0x5653650000, 18928)]);
        // An address outside any file mapping finds nothing to drop.
        assert!(droppable(SMAPS, 0x5653681234).is_empty());
        assert!(droppable(SMAPS, 0x1).is_empty());
    }

    #[test]
    fn a_swapped_out_private_copy_or_an_unknown_format_keeps_its_mapping() {
        let smaps = "7f00-8f00 r--p 00000000 fe:00 7 /opt/vkube\nRss: 8 kB\nAnonymous: 0 kB\nSwap: 4 kB\n";
        assert!(droppable(smaps, 0x7f10).is_empty());
        let smaps = "7f00-8f00 r--p 00000000 fe:00 7 /opt/vkube\nRss: 8 kB\n";
        assert!(droppable(smaps, 0x7f10).is_empty());
        let smaps = "7f00-8f00 r--p 00000000 fe:00 7 /opt/vkube\nRss: 8 kB\nAnonymous: 0 kB\nSwap: 0 kB\n";
        assert_eq!(droppable(smaps, 0x7f10).len(), 1);
    }

    /// The real thing on this test binary: its code pages leave its resident memory, and it
    /// goes on running (the assertions after it run code that was just dropped). It runs alone
    /// in a child process of this binary: other tests running meanwhile would map their code
    /// back and could make the resident figure grow (seen in CI: 7,920 KiB before, 8,512 after).
    #[test]
    fn the_test_binarys_code_pages_leave_its_resident_memory() {
        const ALONE: &str = "VKUBE_TEST_CODE_PAGES_ALONE";
        if std::env::var_os(ALONE).is_none() {
            let module = module_path!().split_once("::").map_or(module_path!(), |(_crate, rest)| rest);
            let name = format!("{module}::the_test_binarys_code_pages_leave_its_resident_memory");
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([name.as_str(), "--exact", "--test-threads=1", "--nocapture"])
                .env(ALONE, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
            assert!(stdout.contains("1 passed"), "the child ran no test: {stdout}");
            return;
        }
        let resident = || {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            droppable(&smaps, give_back as fn() -> std::io::Result<u64> as usize).iter().map(|m| m.rss_kib).sum::<u64>()
        };
        let before = resident();
        let given = give_back().unwrap();
        let after = resident();
        assert!(given > 0, "gave back nothing of {before} KiB");
        assert!(after < before, "{after} KiB of code still resident after giving back (was {before} KiB)");
    }
}
