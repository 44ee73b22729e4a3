//! Transparent huge pages, per command. mimalloc asks the kernel for them on its arenas; training keeps them (its
//! buffers are reused every step: a 400-400 DeepFM trains ~10% faster with them), but a short batch job that
//! touches a few hundred MiB once spends more time in the kernel clearing 2 MiB pages and compacting memory to
//! find them than computing: a million-event materialization took 0.45–0.8 s with them and 0.3–0.4 s without.
//!
//! The choice has to be made before the allocator starts: its first arena is reserved, and its first huge page
//! faulted in, before `main` runs, and on a fragmented machine that one fault stalled a quarter of the runs by
//! 10–15 ms. So a constructor that runs ahead of the allocator's reads the command and, for the batch feature
//! commands, sets `MIMALLOC_ALLOW_THP=0` (unless the environment already says otherwise), which makes mimalloc
//! neither ask for huge pages nor let the kernel use them for the process.

#![allow(
    unsafe_code,
    reason = "the allocator is tuned from argv before main, in .init_array"
)]

use std::ffi::{CStr, c_char, c_int};

/// The commands that run once over their input and exit.
const BATCH_COMMANDS: [&[u8]; 2] = [b"materialize", b"build-dataset"];

/// Runs before mimalloc's own constructor: the linker orders prioritized `.init_array` entries first. (glibc
/// passes every `.init_array` function the program's arguments; the module is built for glibc targets only.)
#[used]
#[unsafe(link_section = ".init_array.00200")]
static BEFORE_THE_ALLOCATOR: extern "C" fn(c_int, *const *const c_char) = choose_for_command;

extern "C" fn choose_for_command(argc: c_int, argv: *const *const c_char) {
    if argc < 2 || argv.is_null() {
        return;
    }
    // SAFETY: glibc passes `.init_array` functions the program's argc and argv: argc valid pointers to
    // NUL-terminated strings.
    let command = unsafe {
        let first = *argv.add(1);
        if first.is_null() {
            return;
        }
        CStr::from_ptr(first)
    };
    if BATCH_COMMANDS.contains(&command.to_bytes()) {
        // SAFETY: no other thread exists yet; both strings are NUL-terminated literals.
        unsafe {
            libc::setenv(c"MIMALLOC_ALLOW_THP".as_ptr(), c"0".as_ptr(), 0);
        }
    }
}
