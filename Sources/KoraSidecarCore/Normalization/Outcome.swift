/// What a verification result means for the application (SPEC §6 `outcome`).
package enum Outcome: String, Sendable, CaseIterable {
    case approved, rejected, review, failed, expired, pending, unknown

    /// The outcome from Kora's `decision`, else its `status`, else the event type.
    package init(decision: String?, status: String?, eventType: String) {
        if let decision, let outcome = Self.byDecision[decision.lowercased()] {
            self = outcome
        } else if let status = status?.lowercased() {
            self = Self.byStatus[status] ?? (status.hasSuffix("_required") ? .pending : Self.byEventType(eventType))
        } else {
            self = Self.byEventType(eventType)
        }
    }

    private static let byDecision: [String: Outcome] = [
        "auto_approve": .approved, "auto_reject": .rejected, "manual_review": .review,
        "approve": .approved, "reject": .rejected,
    ]

    private static let byStatus: [String: Outcome] = [
        "verified": .approved, "approved": .approved, "rejected": .rejected, "manual_review": .review,
        "review_required": .review, "failed": .failed, "expired": .expired, "pending": .pending,
        "processing": .pending,
    ]

    private static func byEventType(_ type: String) -> Outcome {
        switch type {
        case "verification.verified", "verification.approved": .approved
        case "verification.rejected": .rejected
        case "verification.expired": .expired
        default: .unknown
        }
    }
}
