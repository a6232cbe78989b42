//! What the process's allocator does with the blocks tract and ONNX Runtime free.
//!
//! A model's run allocates and frees values of megabytes (BERT-base's activations on a batch
//! of 8×128 take 3 to 12 MB each) from as many threads as run batches. glibc serves blocks
//! above its mmap threshold with a mapping of their own, given back when freed, and the rest
//! from per-thread heaps that keep freed memory for the next request. Its threshold starts at
//! 128 KiB and rises to the size of the largest mapped block freed (up to 32 MB): after the
//! first freed activation, every later one comes from a heap, and each thread's heap grows to
//! what its runs held at their peak. Calibrating BERT-base in tract on 8×128 batches (438 MB
//! of weights) peaked at 1379 MB that way, at 1233 MB with large blocks kept mapped, and at
//! 930 MB with large batches also run one at a time (`engine::batches_at_once`).

/// Serves every block of `LARGE_BLOCK` bytes and more with a mapping of its own, given back to
/// the kernel when freed, for the rest of the process (a fixed threshold also stops glibc
/// from raising it). Costs a mapping and its page faults per large block, small next to
/// the run that fills it. The command line calls it as it starts: a process of its own. A
/// library caller's process (Python's) keeps the policy its owner chose.
pub fn map_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only changes the allocator's policy for blocks allocated afterwards.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE_BLOCK as libc::c_int);
        });
    }
}

/// Blocks from this size on are mapped on their own (`map_large_blocks`): 1 MiB, below a
/// transformer's activations and above the small tensors and buffers of every node.
pub const LARGE_BLOCK: usize = 1 << 20;

/// Asks the allocator to hand freed memory back to the kernel. glibc keeps freed blocks below
/// its mmap threshold in its heaps: a model's worth of tract tensors freed at once would stay
/// counted against the process while the next step allocates as much again.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}
