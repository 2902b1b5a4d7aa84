#if KORA_SIDECAR_TSAN
import KoraSidecar

/// In a ThreadSanitizer build the tests lock with the library's pthread-based `Mutex` too (see
/// Sources/KoraSidecar/Concurrency/Mutex+ThreadSanitizer.swift), which shadows the standard one here.
typealias Mutex = KoraSidecar.Mutex
#endif
