//! The global allocator: first-fit over an address-ordered free list in a
//! static arena, with coalescing on free. Small and predictable; enough for
//! the probe's strings and for virtio queues and buffers (page-aligned
//! allocations included).

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicBool, Ordering};

/// Size of the arena.
pub const HEAP_SIZE: usize = 1024 * 1024;
/// Every block is a multiple of this and aligned to it.
const GRANULE: usize = 16;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; HEAP_SIZE]>);

/// A free block, stored in the block itself.
struct FreeBlock {
    size: usize,
    next: Option<NonNull<FreeBlock>>,
}

/// The allocator state behind a spin lock (no allocation happens in
/// interrupt context; the lock only guards against future SMP use).
pub struct Heap {
    lock: AtomicBool,
    arena: Arena,
    state: UnsafeCell<State>,
}

struct State {
    initialized: bool,
    head: Option<NonNull<FreeBlock>>,
}

// SAFETY: all access to `arena` and `state` happens with `lock` held.
unsafe impl Sync for Heap {}

#[global_allocator]
static HEAP: Heap = Heap {
    lock: AtomicBool::new(false),
    arena: Arena(UnsafeCell::new([0; HEAP_SIZE])),
    state: UnsafeCell::new(State {
        initialized: false,
        head: None,
    }),
};

fn round_up(value: usize, to: usize) -> Option<usize> {
    Some(value.checked_add(to - 1)? & !(to - 1))
}

impl Heap {
    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference.
        let state = unsafe { &mut *self.state.get() };
        if !state.initialized {
            let base = self.arena.0.get().cast::<FreeBlock>();
            // SAFETY: the arena is ours, aligned and large enough for a
            // block header; it becomes one free block.
            unsafe {
                base.write(FreeBlock {
                    size: HEAP_SIZE,
                    next: None,
                })
            };
            state.head = NonNull::new(base);
            state.initialized = true;
        }
        let result = f(state);
        self.lock.store(false, Ordering::Release);
        result
    }
}

/// Block size used for `layout`.
fn block_size(layout: Layout) -> Option<usize> {
    round_up(layout.size().max(GRANULE), GRANULE)
}

// SAFETY: blocks handed out are disjoint parts of the arena, aligned as
// requested, and only return to the free list through `dealloc`.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(size) = block_size(layout) else {
            return ptr::null_mut();
        };
        let align = layout.align().max(GRANULE);
        self.with_state(|state| {
            let mut link: *mut Option<NonNull<FreeBlock>> = &mut state.head;
            // SAFETY: the list only holds disjoint free blocks of the arena,
            // each at least GRANULE bytes and GRANULE-aligned.
            unsafe {
                while let Some(block) = *link {
                    let start = block.as_ptr() as usize;
                    let FreeBlock { size: free, next } = block.as_ptr().read();
                    let end = start + free;
                    if let Some(at) = round_up(start, align) {
                        if at.checked_add(size).is_some_and(|e| e <= end) {
                            // Split into [start, at) (stays free), the
                            // allocation, and [at + size, end) (free).
                            let mut rest = next;
                            if at + size < end {
                                let tail = (at + size) as *mut FreeBlock;
                                tail.write(FreeBlock {
                                    size: end - at - size,
                                    next,
                                });
                                rest = NonNull::new(tail);
                            }
                            if at > start {
                                (*block.as_ptr()).size = at - start;
                                (*block.as_ptr()).next = rest;
                            } else {
                                *link = rest;
                            }
                            return at as *mut u8;
                        }
                    }
                    link = &raw mut (*block.as_ptr()).next;
                }
            }
            ptr::null_mut()
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(size) = block_size(layout) else {
            return;
        };
        let start = ptr as usize;
        self.with_state(|state| {
            // SAFETY: `ptr` came from `alloc` with this layout, so
            // [start, start + size) is an allocated, GRANULE-aligned part
            // of the arena; the list walk is as in `alloc`.
            unsafe {
                // Find the free neighbours: prev < start < next.
                let mut prev: Option<NonNull<FreeBlock>> = None;
                let mut next = state.head;
                while let Some(block) = next {
                    if block.as_ptr() as usize > start {
                        break;
                    }
                    prev = Some(block);
                    next = (*block.as_ptr()).next;
                }
                let new = start as *mut FreeBlock;
                new.write(FreeBlock { size, next });
                // Merge with the following block.
                if let Some(n) = next {
                    if start + size == n.as_ptr() as usize {
                        (*new).size += (*n.as_ptr()).size;
                        (*new).next = (*n.as_ptr()).next;
                    }
                }
                // Link in after `prev`, merging with it where adjacent.
                match prev {
                    Some(p) if p.as_ptr() as usize + (*p.as_ptr()).size == start => {
                        (*p.as_ptr()).size += (*new).size;
                        (*p.as_ptr()).next = (*new).next;
                    }
                    Some(p) => (*p.as_ptr()).next = NonNull::new(new),
                    None => state.head = NonNull::new(new),
                }
            }
        });
    }
}
