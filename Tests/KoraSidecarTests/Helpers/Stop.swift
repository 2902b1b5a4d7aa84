import ServiceLifecycle

/// Runs a store's service (from `StorageConfiguration.open`) to its end as a stop would: the store
/// closes, and a SQLite store's lock is given back.
func stop(_ service: any Service) async throws {
    let running = Task { try await service.run() }
    running.cancel()
    try await running.value
}
