#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Walks a parsed configuration document, reading typed values with defaults and collecting every
/// problem with its JSON path instead of stopping at the first.
final class ConfigurationReader {
    private(set) var problems: [ConfigurationProblem] = []
    private let environment: [String: String]
    private let resolvesSecrets: Bool

    /// Without `resolvesSecrets`, `{"env"}` and `{"file"}` secrets are checked for shape only and
    /// not read (commands that only need the store, such as `deliveries`).
    init(environment: [String: String], resolvesSecrets: Bool = true) {
        self.environment = environment
        self.resolvesSecrets = resolvesSecrets
    }

    func report(_ path: String, _ reason: String) {
        problems.append(ConfigurationProblem(path: path, reason: reason))
    }

    /// The object at `path`, checking its keys against `keys` (nil: any key); an absent value reads as empty.
    func object(_ value: JSONValue?, at path: String, keys: Set<String>?) -> ObjectReader {
        switch value {
        case nil, .null?:
            return ObjectReader(reader: self, path: path, members: [])
        case .object(let members)?:
            for member in members where keys.map({ !$0.contains(member.key) }) ?? false {
                let known = (keys ?? []).sorted().joined(separator: ", ")
                report("\(path).\(member.key)", "unknown key (expected one of: \(known))")
            }
            return ObjectReader(reader: self, path: path, members: members)
        case let other?:
            report(path, "must be an object, not \(other.kindName)")
            return ObjectReader(reader: self, path: path, members: [])
        }
    }

    /// Why an error does not quote a variable's name or a file's path that does not look like one
    /// (`A_NAME`, a path with a `/`): it may be the secret itself, pasted in the wrong place.
    private static let notRepeated = "the name is not repeated here: it does not look like one, and may be the secret itself"

    /// Upper-case letters, digits and `_`: how environment variables are named.
    private static func isConventionalName(_ byte: UInt8) -> Bool {
        byte == UInt8(ascii: "_") || byte.isASCIIDigit || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
    }

    /// The variable's name when `text` is all one shell reference, `$NAME` or `${NAME}`.
    static func shellVariable(_ text: String) -> String? {
        var name = Substring(text)
        guard name.first == "$" else { return nil }
        name = name.dropFirst()
        if name.first == "{", name.last == "}" { name = name.dropFirst().dropLast() }
        guard let first = name.utf8.first, first == UInt8(ascii: "_") || first.isASCIILetter,
            name.utf8.allSatisfy({ $0 == UInt8(ascii: "_") || $0.isASCIILetter || $0.isASCIIDigit })
        else { return nil }
        return String(name)
    }

    /// Resolves a secret written as `{"env": …}`, `{"file": …}` or a plain string; `always` resolves
    /// it even when the reader checks secrets for shape only (the store's address is needed by every command).
    func secret(_ value: JSONValue, at path: String, always: Bool = false) -> Secret? {
        let resolvesSecrets = resolvesSecrets || always
        switch value {
        case .string(let literal):
            guard !literal.isEmpty else {
                report(path, "must not be empty")
                return nil
            }
            if let name = Self.shellVariable(literal) {
                // Used as written, it would fail every signature or call, with nothing saying why.
                report(path, "is \(literal), which the file does not expand: write {\"env\": \"\(name)\"}")
                return nil
            }
            return usable(Secret(literal, source: .literal), at: path)
        case .object:
            let object = self.object(value, at: path, keys: ["env", "file"])
            let name = object.optionalString("env")
            let file = object.optionalString("file")
            switch (name, file) {
            case (let name?, nil) where !resolvesSecrets:
                return Secret("", source: .environment(name))
            case (nil, let file?) where !resolvesSecrets:
                return Secret("", source: .file(file))
            case (let name?, nil):
                // A trailing line break is how `echo` and `kubectl create secret --from-file` leave it, as with files.
                guard let resolved = environment[name].map(Self.withoutTrailingLineBreaks), !resolved.isEmpty else {
                    report(
                        path,
                        name.utf8.allSatisfy(Self.isConventionalName)
                            ? "environment variable \(name) is not set"
                            : "the environment variable named in \"env\" is not set (\(Self.notRepeated))")
                    return nil
                }
                return usable(Secret(resolved, source: .environment(name)), at: path)
            case (nil, let file?):
                guard let data = FileManager.default.contents(atPath: file) else {
                    report(
                        path,
                        file.contains("/") ? "secret file \(file) cannot be read" : "the secret file named in \"file\" cannot be read (\(Self.notRepeated))")
                    return nil
                }
                let text = Self.withoutTrailingLineBreaks(String(decoding: data, as: UTF8.self))
                guard !text.isEmpty else {
                    report(path, "secret file \(file) is empty")
                    return nil
                }
                return usable(Secret(text, source: .file(file)), at: path)
            case (.some, .some):
                report(path, "give either \"env\" or \"file\", not both")
                return nil
            case (nil, nil):
                report(path, "must be {\"env\": \"NAME\"}, {\"file\": \"/path\"} or a string")
                return nil
            }
        default:
            report(path, "must be {\"env\": \"NAME\"}, {\"file\": \"/path\"} or a string, not \(value.kindName)")
            return nil
        }
    }

    /// `secret`, unless it holds a control character: a key or token goes into a header, where the
    /// HTTP client would refuse it with an error that quotes it; the problem names where it came
    /// from, never the value.
    private func usable(_ secret: Secret, at path: String) -> Secret? {
        // A tab is allowed inside: HTTP allows it in a field value (a deliver.headers value is a secret
        // too), but strips it at either end, where the value would then never match.
        let scalars = secret.value.unicodeScalars
        guard scalars.contains(where: { ($0.value < 0x20 && $0 != "\t") || $0.value == 0x7F }) || scalars.first == "\t" || scalars.last == "\t"
        else { return secret }
        let origin =
            switch secret.source {
            case .literal: "the value"
            case .environment(let name): "environment variable \(name)"
            case .file(let file): "secret file \(file)"
            }
        report(path, "\(origin) holds a control character (a line break inside it, or a tab at an end?); remove it")
        return nil
    }

    private static func withoutTrailingLineBreaks(_ text: String) -> String {
        var scalars = text.unicodeScalars[...]
        while let last = scalars.last, last == "\n" || last == "\r" { scalars.removeLast() }
        return String(scalars)
    }
}

/// Reads the members of one configuration object.
struct ObjectReader {
    let reader: ConfigurationReader
    let path: String
    let members: [JSONMember]

    func value(_ key: String) -> JSONValue? {
        members.last(where: { $0.key == key })?.value
    }

    func has(_ key: String) -> Bool { value(key).map { $0 != .null } ?? false }

    func path(_ key: String) -> String { "\(path).\(key)" }

    func object(_ key: String, keys: Set<String>?) -> ObjectReader {
        reader.object(value(key), at: path(key), keys: keys)
    }

    /// The duration at `key` (`"250ms"`, `"10s"`, `"2m"` …) up to `longest`, else `defaultValue`;
    /// reports anything else.
    func duration(_ key: String, default defaultValue: Duration, upTo longest: Duration, describedAs longestText: String) -> Duration {
        guard let text = optionalString(key) else { return defaultValue }
        guard let duration = DurationText.parse(text), duration <= longest else {
            reader.report(path(key), "must be a duration up to \(longestText), such as \"10s\"")
            return defaultValue
        }
        return duration
    }

    func optionalString(_ key: String) -> String? {
        switch value(key) {
        case nil, .null?: return nil
        case .string(let s)?: return s
        case let other?:
            reader.report(path(key), "must be a string, not \(other.kindName)")
            return nil
        }
    }

    func string(_ key: String, default defaultValue: String) -> String {
        optionalString(key) ?? defaultValue
    }

    func requiredString(_ key: String) -> String? {
        guard let s = optionalString(key) else {
            if !has(key) { reader.report(path(key), "is required") }
            return nil
        }
        return s
    }

    func int(_ key: String, default defaultValue: Int, in range: ClosedRange<Int>) -> Int {
        switch value(key) {
        case nil, .null?: return defaultValue
        case .number(let text)?:
            guard let number = Int(text), range.contains(number) else {
                reader.report(path(key), "must be a whole number from \(range.lowerBound) to \(range.upperBound)")
                return defaultValue
            }
            return number
        case let other?:
            reader.report(path(key), "must be a number, not \(other.kindName)")
            return defaultValue
        }
    }

    func bool(_ key: String, default defaultValue: Bool) -> Bool {
        switch value(key) {
        case nil, .null?: return defaultValue
        case .bool(let b)?: return b
        case let other?:
            reader.report(path(key), "must be true or false, not \(other.kindName)")
            return defaultValue
        }
    }

    func enumeration<E: RawRepresentable & CaseIterable>(_ key: String, default defaultValue: E) -> E
    where E.RawValue == String {
        guard let text = optionalString(key) else { return defaultValue }
        guard let parsed = E(rawValue: text) else {
            let allowed = E.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", ")
            reader.report(path(key), "must be one of \(allowed), not \"\(text)\"")
            return defaultValue
        }
        return parsed
    }

    /// An array, each element read by `element` with its own path; nil when absent.
    func array<T>(_ key: String, _ element: (JSONValue, String) -> T?) -> [T]? {
        switch value(key) {
        case nil, .null?: return nil
        case .array(let values)?:
            return values.enumerated().compactMap { element($0.element, "\(path(key))[\($0.offset)]") }
        case let other?:
            reader.report(path(key), "must be an array, not \(other.kindName)")
            return nil
        }
    }

    func stringArray(_ key: String) -> [String]? {
        array(key) { value, path in
            guard case .string(let s) = value else {
                reader.report(path, "must be a string, not \(value.kindName)")
                return nil
            }
            return s
        }
    }

    func optionalSecret(_ key: String, always: Bool = false) -> Secret? {
        guard let value = value(key), value != .null else { return nil }
        return reader.secret(value, at: path(key), always: always)
    }
}
