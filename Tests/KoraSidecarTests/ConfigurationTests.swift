import AsyncHTTPClient
import Foundation
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

@Suite("Configuration")
struct ConfigurationTests {
    let environment = ["KORAIDV_WEBHOOK_SECRET": "whsec_from_env", "APP_SIGNING": TestSecrets.signing, "KEY": "live_key_value"]

    func load(_ text: String, environment: [String: String]? = nil) throws -> SidecarConfiguration {
        try SidecarConfiguration.load(bytes: Array(text.utf8), source: "test.json", environment: environment ?? self.environment)
    }

    func problems(_ text: String, environment: [String: String]? = nil) -> [ConfigurationProblem] {
        do {
            _ = try load(text, environment: environment)
            return []
        } catch let error as ConfigurationError {
            return error.problems
        } catch {
            return [.init(path: "?", reason: "\(error)")]
        }
    }

    func problemsFromEnvironment(_ environment: [String: String]) -> [ConfigurationProblem] {
        do {
            _ = try ConfigurationSource.environment.load(environment: environment)
            return []
        } catch let error as ConfigurationError {
            return error.problems
        } catch {
            return [.init(path: "?", reason: "\(error)")]
        }
    }

    @Test func theMinimalFileGetsEveryDefault() throws {
        let configuration = try load(#"{"webhooks": {"secrets": [{"env": "KORAIDV_WEBHOOK_SECRET"}]}}"#)
        #expect(configuration.webhooks.secrets.map(\.value) == ["whsec_from_env"])
        #expect(configuration.webhooks.listen == .tcp(host: "0.0.0.0", port: 8080))
        #expect(configuration.webhooks.path == "/webhooks/koraidv")
        #expect(configuration.webhooks.schemes == [.timestamped, .legacy])
        #expect(configuration.webhooks.toleranceSeconds == 300)
        #expect(configuration.webhooks.limits.maxBodyBytes == 1_048_576)
        #expect(configuration.webhooks.enforce)
        #expect(configuration.webhooks.dedupWindowHours == 168)
        #expect(configuration.internal.listen == .tcp(host: "127.0.0.1", port: 8081))
        #expect(configuration.internal.limits.maxBodyBytes == 26_214_400)
        #expect(configuration.kora.apiBaseURL == "https://api.korastratum.com/api/v1/idv")
        #expect(configuration.kora.timeoutSeconds == 30)
        #expect(configuration.kora.retry == RetryConfiguration())
        #expect(configuration.delivery.mode == .queued)
        #expect(configuration.delivery.retrySchedule.map(DurationText.format) == ["5s", "30s", "2m", "10m", "30m", "1h", "2h", "4h", "8h", "12h"])
        #expect(configuration.delivery.concurrency == 16)
        #expect(configuration.storage.sqlitePath == "./data/kora-sidecar.sqlite")
        #expect(configuration.logging.level == "info")
        #expect(configuration.logging.format == .json)
    }

    @Test func everyProblemIsReportedAtOnceWithItsPath() {
        let found = problems(
            """
            {"webhooks": {"secrets": [{"env": "MISSING_VAR"}], "toleranceSecond": 5, "maxBodyBytes": "big", "path": "hooks"},
             "kora": {"timeoutSeconds": 0, "apiBaseURL": "ftp://x"},
             "services": [{"name": "a b", "deliver": {"url": "http://x", "events": [], "format": "xml"}}, {"name": "c"}, {"name": "d"}],
             "delivery": {"mode": "later", "retrySchedule": ["5s", "soon", "31d"]},
             "logging": {"level": "loud"},
             "extra": true}
            """)
        let paths = Set(found.map(\.path))
        for path in [
            "$.webhooks.secrets[0]", "$.webhooks.toleranceSecond", "$.webhooks.maxBodyBytes", "$.webhooks.path",
            "$.kora.timeoutSeconds", "$.kora.apiBaseURL", "$.services[0].name", "$.services[0].deliver.events",
            "$.services[0].deliver.format", "$.delivery.mode", "$.delivery.retrySchedule[1]", "$.delivery.retrySchedule[2]", "$.logging.level",
            "$.extra", "$.services[1].token",
        ] {
            #expect(paths.contains(path), "expected a problem at \(path); got \(found)")
        }
        #expect(found.first { $0.path == "$.webhooks.secrets[0]" }?.reason == "environment variable MISSING_VAR is not set")
        #expect(found.first { $0.path == "$.webhooks.toleranceSecond" }?.reason.hasPrefix("unknown key") == true)
    }

    @Test func secretsComeFromEnvironmentFilesOrLiterals() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try "whsec_from_file\n".write(toFile: directory + "/secret", atomically: true, encoding: .utf8)
        let configuration = try load(
            #"{"webhooks": {"secrets": [{"env": "KORAIDV_WEBHOOK_SECRET"}, {"file": "\#(directory)/secret"}, "whsec_literal"]}}"#)
        #expect(configuration.webhooks.secrets.map(\.value) == ["whsec_from_env", "whsec_from_file", "whsec_literal"])
        #expect(configuration.webhooks.secrets[1].source == .file(directory + "/secret"))
        let missing = problems(#"{"webhooks": {"secrets": [{"file": "\#(directory)/absent"}]}}"#)
        #expect(missing == [.init(path: "$.webhooks.secrets[0]", reason: "secret file \(directory)/absent cannot be read")])
        #expect(!problems(#"{"webhooks": {"secrets": [{"env": "A", "file": "/b"}]}}"#).isEmpty)
        #expect(!problems(#"{"webhooks": {"secrets": [{"vault": "x"}]}}"#).isEmpty)
    }

    @Test func aSecretEndsAtItsLastLineBreakAndHoldsNoOtherControlCharacter() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try "whsec_from_file\r\n".write(toFile: directory + "/secret", atomically: true, encoding: .utf8)
        var environment = self.environment
        environment["KEY"] = "live_key_value\n"
        let configuration = try load(
            #"{"kora": {"apiKey": {"env": "KEY"}}, "webhooks": {"secrets": [{"file": "\#(directory)/secret"}]}}"#, environment: environment)
        #expect(configuration.kora.apiKey?.value == "live_key_value")
        #expect(configuration.webhooks.secrets.map(\.value) == ["whsec_from_file"])
        environment["KEY"] = "live_key\nvalue"
        let found = problems(#"{"kora": {"apiKey": {"env": "KEY"}}, "webhooks": {"secrets": ["whsec_\u0007"]}}"#, environment: environment)
        #expect(
            found == [
                .init(path: "$.webhooks.secrets[0]", reason: "the value holds a control character (a line break inside it, or a tab at an end?); remove it"),
                .init(path: "$.kora.apiKey", reason: "environment variable KEY holds a control character (a line break inside it, or a tab at an end?); remove it"),
            ])
        #expect(!found.description.contains("live_key"))
    }

    @Test func theHTTPClientsErrorIsDescribedWithoutTheHeaderValuesItQuotes() {
        let error = HTTPClientError.invalidHeaderFieldValues(["Bearer live_key_value"])
        #expect(!HTTPClientFailure.describe(error).contains("live_key_value"))
    }

    @Test func secretsCanBeLeftUnreadForStoreOnlyCommands() throws {
        let text = #"{"webhooks": {"secrets": [{"env": "ABSENT_VAR"}, {"file": "/absent/file"}]}, "storage": {"sqlitePath": "/tmp/x.sqlite"}}"#
        #expect(throws: ConfigurationError.self) { try load(text) }
        let configuration = try SidecarConfiguration.load(bytes: Array(text.utf8), source: "t", environment: [:], resolvingSecrets: false)
        #expect(configuration.storage.sqlitePath == "/tmp/x.sqlite")
        // Shape is still checked.
        #expect(throws: ConfigurationError.self) {
            try SidecarConfiguration.load(bytes: Array(#"{"webhooks": {"secrets": [{"vault": 1}]}}"#.utf8), source: "t", environment: [:], resolvingSecrets: false)
        }
    }

    @Test func secretsAreRequired() {
        #expect(problems("{}").map(\.path) == ["$.webhooks.secrets"])
        #expect(problems(#"{"webhooks": {"secrets": []}}"#).map(\.path) == ["$.webhooks.secrets"])
    }

    @Test func invalidJSONNamesTheLineAndColumn() {
        let found = problems("{\n  \"webhooks\": {,\n}")
        #expect(found.count == 1)
        #expect(found.first?.reason.contains("line 2, column 16") == true)
        #expect(problems(#"{"webhooks": {"secrets": ["a"]}, "webhooks": {}}"#).first?.reason.contains("duplicate key") == true)
    }

    @Test func servicesAreValidatedTogether() {
        let found = problems(
            """
            {"webhooks": {"secrets": ["s"]}, "services": [
              {"name": "app", "deliver": {"unixSocket": "/tmp/\(String(repeating: "x", count: 120))"}},
              {"name": "app", "token": "t", "deliver": {"url": "http://a", "unixSocket": "/tmp/s"}},
              {"name": "other", "token": "t2", "allow": ["GET"], "deliver": {"url": "http://a", "signingSecret": "whsec_!!", "headers": {"webhook-id": "x", "Bad Header": "y", "X-Split": "a\\r\\nX-Injected: 1"}}}
            ]}
            """)
        let paths = found.map(\.path)
        #expect(paths.contains("$.services[0].deliver.unixSocket"))
        #expect(paths.contains("$.services[1].name"))
        #expect(paths.contains("$.services[1].deliver"))
        #expect(paths.contains("$.services[2].allow[0]"))
        #expect(paths.contains("$.services[2].deliver.signingSecret"))
        #expect(paths.contains("$.services[2].deliver.headers.webhook-id"))
        #expect(paths.contains("$.services[2].deliver.headers.Bad Header"))
        #expect(paths.contains("$.services[2].deliver.headers.X-Split"))

        // A socket's request path goes on the request line as written: what HTTP refuses there is
        // refused at start-up, not on every delivery.
        for (path, refused) in [("/hooks/{svc}", true), ("/a b", true), ("/\u{fc}", true), ("/a#b", true), ("/kora%20events?x=1&y=[2]", false)] {
            let found = problems(
                #"{"webhooks": {"secrets": ["s"]}, "services": [{"name": "a", "deliver": {"unixSocket": "/tmp/s", "path": "\#(path)"}}]}"#)
            #expect(found.map(\.path).contains("$.services[0].deliver.path") == refused, "\(path)")
        }

        // The secret being replaced is a Standard Webhooks secret too, and needs the one replacing it.
        let rotation = problems(
            """
            {"webhooks": {"secrets": ["s"]}, "services": [
              {"name": "a", "token": "t1", "deliver": {"url": "http://a", "previousSigningSecret": "\(TestSecrets.signing)"}},
              {"name": "b", "token": "t2", "deliver": {"url": "http://b", "signingSecret": "\(TestSecrets.signing)", "previousSigningSecret": "whsec_!!"}}
            ]}
            """).map(\.path)
        #expect(rotation.sorted() == ["$.services[0].deliver.previousSigningSecret", "$.services[1].deliver.previousSigningSecret"])
    }

    @Test func listenersMustNotCollide() {
        let found = problems(#"{"webhooks": {"secrets": ["s"], "listen": {"port": 9000}}, "internal": {"listen": {"port": 9000}}}"#)
        #expect(found.map(\.path).contains("$.internal.listen.port"))
        let both = problems(#"{"webhooks": {"secrets": ["s"], "listen": {"port": 1, "unixSocket": "/tmp/a.sock"}}}"#)
        #expect(both.map(\.path) == ["$.webhooks.listen"])
    }

    @Test func aSecretWrittenAsAShellVariableIsRefusedWithWhatToWrite() {
        let found = problems(#"{"webhooks": {"secrets": ["${KORAIDV_WEBHOOK_SECRET}"]}, "kora": {"apiKey": "$KORA_KEY"}}"#)
        #expect(found.map(\.path) == ["$.webhooks.secrets[0]", "$.kora.apiKey"])
        #expect(found.first?.reason == #"is ${KORAIDV_WEBHOOK_SECRET}, which the file does not expand: write {"env": "KORAIDV_WEBHOOK_SECRET"}"#)
        // A secret that only holds a dollar sign is a secret.
        #expect(problems(#"{"webhooks": {"secrets": ["whsec_$ab", "$1abc", "${A B}"]}}"#).isEmpty)
    }

    @Test func eventPatternsThatCanMatchNothingAreRefusedAndUnknownNamesWarned() throws {
        func service(_ events: String) -> String {
            #"{"webhooks": {"secrets": ["s"]}, "services": [{"name": "a", "token": "t", "deliver": {"url": "http://h/e", "events": \#(events)}}]}"#
        }
        let found = problems(
            service(#"["*.created", "fraud_alert*", " verification.completed", "sidecar.service.pause", "sidecar.servce.*", "verification.*", "sidecar.*", "sidecar.service.*"]"#))
        #expect(found.map(\.path) == (0..<5).map { "$.services[0].deliver.events[\($0)]" })
        #expect(found.last?.reason.contains("sidecar.service.paused") == true)
        let typo = try load(service(#"["verification.complete", "verifcation.*", "fraud_alert.created", "sidecar.delivery.dead"]"#))
        let documented = "(fraud_alert.created, verification.approved, verification.completed, verification.expired, verification.rejected, verification.verified)"
        #expect(typo.startupWarnings == ["verification.complete", "verifcation.*"].map {
            #"Service a receives events matching "\#($0)", which matches none of the types Kora documents \#(documented): check services[].deliver.events for a typo."#
        })
    }

    @Test func aSecretPastedWhereItsVariableOrFileIsNamedIsNotRepeated() {
        let found = problems(#"{"webhooks": {"secrets": [{"env": "whsec_pasted1"}, {"file": "whsec_pasted2"}, {"env": "MISSING_ONE"}]}}"#)
        #expect(found.count == 3)
        #expect(!found.contains { $0.reason.contains("pasted") })
        #expect(found.first?.reason.hasPrefix("the environment variable named in \"env\" is not set") == true)
        #expect(found.last?.reason == "environment variable MISSING_ONE is not set")
    }

    @Test func theEnvironmentSaysWhatItCannotDo() {
        // A misspelt variable, which the environment-only start would ignore; Kubernetes' own for a
        // Service named kora-sidecar are left alone.
        let environment = [
            "KORAIDV_WEBHOOK_SECRET": "w", "KORA_SIDECAR_ADMIN_TOKN": "x", "KORA_SIDECAR_SERVICE_HOST": "10.0.0.1",
            "KORA_SIDECAR_SERVICE_PORT": "8080", "KORA_SIDECAR_PORT": "tcp://10.0.0.1:8080", "KORA_SIDECAR_FORWARD_URL": "http://app:8080/e",
        ]
        #expect(ConfigurationSource.environment.warnings(environment: environment) == [
            "KORA_SIDECAR_ADMIN_TOKN is set, which kora-sidecar does not read: did you mean KORA_SIDECAR_ADMIN_TOKEN?"
        ])
        // With a file, the environment's settings change nothing: said, as a file found in the working folder wins.
        #expect(ConfigurationSource.file("/etc/kora-sidecar/config.json").warnings(environment: environment) == [
            "KORA_SIDECAR_FORWARD_URL is set, but the configuration comes from /etc/kora-sidecar/config.json: "
                + "these variables apply only without a configuration file (remove the file, or set the keys in it)."
        ])
        // A path beside a URL is refused under its variable's name, not dropped.
        let path = problemsFromEnvironment(["KORAIDV_WEBHOOK_SECRET": "w", "KORA_SIDECAR_FORWARD_URL": "http://app/e", "KORA_SIDECAR_FORWARD_PATH": "/x"])
        #expect(path.map(\.path) == ["KORA_SIDECAR_FORWARD_PATH"])
    }

    @Test func everyServiceBeyondTheOneWithoutATokenIsReportedAtOnce() {
        let found = problems(#"{"webhooks": {"secrets": ["s"]}, "services": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}"#)
        #expect(found.map(\.path) == ["$.services[1].token", "$.services[2].token"])
    }

    @Test func noTwoCallersShareAToken() {
        let services = #"[{"name": "a", "token": "same"}, {"name": "b", "token": "same"}, {"name": "c", "token": "admin"}]"#
        let found = problems(#"{"webhooks": {"secrets": ["s"]}, "internal": {"adminToken": "admin"}, "services": \#(services)}"#)
        #expect(found.map(\.path) == ["$.services[1].token", "$.internal.adminToken"])
        #expect(found.first?.reason == "is the token of services[0]: each service needs its own")
        // One service is the only caller there is: a one-app container may use one token for both.
        #expect(problems(#"{"webhooks": {"secrets": ["s"]}, "internal": {"adminToken": "same"}, "services": [{"name": "a", "token": "same"}]}"#).isEmpty)
    }

    @Test func anInternalListenerOthersCanReachWithoutTokensIsWarnedOf() throws {
        let exposed = try load(#"{"webhooks": {"secrets": ["s"]}, "internal": {"listen": {"host": "0.0.0.0", "port": 8081}}, "services": [{"name": "app"}]}"#)
        #expect(exposed.startupWarnings.filter { $0.hasPrefix("The internal listener is on 0.0.0.0:8081, not loopback") }.count == 2)
        let guarded = try load(
            #"{"webhooks": {"secrets": ["s"]}, "internal": {"listen": {"host": "0.0.0.0", "port": 8081}, "adminToken": "x"}, "services": [{"name": "app", "token": "t"}]}"#)
        #expect(!guarded.startupWarnings.contains { $0.contains("internal listener") })
        let shared = try load(#"{"webhooks": {"secrets": ["s"]}, "services": [{"name": "a", "token": "t1"}, {"name": "b", "token": "t2"}]}"#)
        #expect(shared.startupWarnings.contains { $0.hasPrefix("Several services share the internal listener and internal.adminToken is not set") })
        let local = try load(#"{"webhooks": {"secrets": ["s"]}, "services": [{"name": "app"}]}"#)
        #expect(!local.startupWarnings.contains { $0.contains("internal") })
    }

    @Test func theDeduplicationWindowCoversEveryTimeAReplayedSignatureHolds() throws {
        let short = problems(#"{"webhooks": {"secrets": ["s"], "toleranceSeconds": 86400, "dedupWindowHours": 1}}"#)
        #expect(short.map(\.path) == ["$.webhooks.dedupWindowHours"])
        #expect(short.first?.reason.contains("at least 48") == true)
        // Exactly twice the tolerance is enough.
        _ = try load(#"{"webhooks": {"secrets": ["s"], "toleranceSeconds": 1800, "dedupWindowHours": 1}}"#)
    }

    @Test func urlsWithAPortBeyond65535OrCredentialsAreRefused() throws {
        // The HTTP client traps on such a port with an IP address: the first proxied call stopped the
        // sidecar. Credentials in a URL were printed by check-config and never sent.
        let found = problems(
            #"""
            {"webhooks": {"secrets": ["s"]},
             "kora": {"apiBaseURL": "http://127.0.0.1:80800/api/v1/idv", "callbackURL": "https://hooks.example.com:0/k"},
             "services": [{"name": "app", "deliver": {"url": "https://svc:SVCPASS@app.internal/events"}}]}
            """#)
        #expect(found.map(\.path) == ["$.kora.apiBaseURL", "$.kora.callbackURL", "$.services[0].deliver.url"])
        #expect(found[0].reason.contains("80800") && found[1].reason.contains("1 to 65535"))
        #expect(found[2].reason.contains("user name or password") && !found.contains { $0.reason.contains("SVCPASS") })
        #expect(HTTPURL.problem("http://[::1]:65535/x") == nil && HTTPURL.problem("https://kora.example/api") == nil)
        // Kora calls the callback URL: credentials for a proxy in front of the sidecar may be in it.
        let callback = try load(#"{"webhooks": {"secrets": ["s"]}, "kora": {"callbackURL": "https://hook:pw@hooks.example.com/k"}}"#)
        #expect(callback.kora.callbackURL == "https://hook:pw@hooks.example.com/k")
    }

    @Test func allowedHostsAreNamesWithoutSchemeOrPort() throws {
        let found = problems(
            #"{"webhooks": {"secrets": ["s"]}, "internal": {"allowedHosts": ["console.example.internal", "http://x", "x:8081", "", 5]}}"#)
        #expect(found.map(\.path) == ["$.internal.allowedHosts[4]", "$.internal.allowedHosts[1]", "$.internal.allowedHosts[2]", "$.internal.allowedHosts[3]"])
        let configuration = try load(#"{"webhooks": {"secrets": ["s"]}, "internal": {"allowedHosts": ["Console.Example.Internal"]}}"#)
        #expect(configuration.internal.allowedHosts == ["console.example.internal"])
    }

    @Test func theEffectiveConfigurationMasksEverySecret() throws {
        let configuration = try load(
            """
            {"kora": {"apiKey": {"env": "KEY"}, "tenantId": "tenant-literal-value", "callbackURL": "https://hook:callback-password-value@hooks.example.com/k"},
             "webhooks": {"secrets": [{"env": "KORAIDV_WEBHOOK_SECRET"}, "whsec_literal_two"]},
             "internal": {"adminToken": "admin-token-value"},
             "services": [{"name": "app", "token": "service-token-value",
               "deliver": {"url": "http://127.0.0.1:3000/e", "signingSecret": {"env": "APP_SIGNING"}, "previousSigningSecret": "whsec_cHJldmlvdXMtc2lnbmluZy1zZWNyZXQ=",
                 "headers": {"X-Api-Key": "header-secret-value"}}}]}
            """)
        let text = JSONWriter.prettyString(configuration.effectiveJSON)
        for secret in [
            "live_key_value", "tenant-literal-value", "whsec_from_env", "whsec_literal_two", "admin-token-value", "service-token-value",
            TestSecrets.signing, "header-secret-value", "callback-password-value", "cHJldmlvdXMtc2lnbmluZy1zZWNyZXQ=",
        ] {
            #expect(!text.contains(secret), "check-config output shows \(secret)")
        }
        #expect(text.contains(#""X-Api-Key": "***""#))
        #expect(text.contains("https://***@hooks.example.com/k"))
        // Whatever the user information holds, escapes no parser decodes included.
        for url in ["https://hook:s%E9cret@hooks.example.com/k", "https://TOKEN@[::1]:8443/k?a=b@c", "https://a@b:c@hooks.example.com"] {
            #expect(HTTPURL.masked(url).hasPrefix("https://***@"), "\(url)")
            #expect(!HTTPURL.masked(url).contains("cret") && !HTTPURL.masked(url).contains("TOKEN"), "\(url)")
        }
        // A callback's token is as often in its query: the query and the fragment are masked too.
        #expect(HTTPURL.masked("https://hooks.example.com/k?a=b@c") == "https://hooks.example.com/k?***")
        #expect(HTTPURL.masked("https://u:p@x.example/p?t=tok#frag") == "https://***@x.example/p?***")
        #expect(HTTPURL.masked("https://x.example/p#frag") == "https://x.example/p#***")
        #expect(HTTPURL.masked("https://x.example/p") == "https://x.example/p")
        // The effective configuration is itself a valid configuration (with secrets put back).
        #expect(try JSONParser.parse(Array(text.utf8))["delivery"]?["mode"] == "queued")
    }

    @Test func postgresURLPartsArePercentDecodedOnce() throws {
        let url = try PostgresURL(Secret("postgres://k%40ra:p%40ss%2541%3A@db.internal/kora%2Dmain"))
        #expect(url.username == "k@ra")
        #expect(url.password == "p@ss%41:")
        #expect(url.database == "kora-main")
        #expect(url.location == "db.internal:5432/kora-main")
    }

    @Test func postgresStorageIsASecretURLCheckedWithoutQuotingIt() throws {
        let secrets = #"{"webhooks": {"secrets": ["w"]}, "storage": "#
        let keys = #", "encryption": {"keys": [{"id": "k1", "key": "\#(TestSecrets.encryptionKey)"}]}"#
        let url = "postgres://kora:pg-password-value@db.internal:6432/kora?sslmode=require"
        let configuration = try load(secrets + #"{"postgresURL": {"env": "DATABASE_URL"}\#(keys)}}"#, environment: ["DATABASE_URL": url])
        #expect(configuration.storage.postgresURL?.value == url)
        let text = JSONWriter.prettyString(configuration.effectiveJSON)
        #expect(!text.contains("pg-password-value"))
        #expect(text.contains(#""postgresURL": "***""#))
        // The URL is read even by store-only commands, which need nothing else secret.
        let storeOnly = try SidecarConfiguration.load(
            bytes: Array((secrets + #"{"postgresURL": {"env": "DATABASE_URL"}\#(keys)}}"#).utf8), source: "t", environment: ["DATABASE_URL": url],
            resolvingSecrets: false)
        #expect(storeOnly.storage.postgresURL?.value == url)

        let both = problems(secrets + #"{"sqlitePath": "/tmp/s", "postgresURL": "postgres://u@h/d"\#(keys)}}"#)
        #expect(both.map(\.path) == ["$.storage.postgresURL"])
        for bad in [
            "mysql://u:secret-in-url@h/d", "postgres://u:secret-in-url@/d", "postgres://:secret-in-url@h/d", "postgres://u:secret-in-url@h",
            "postgres://u:secret-in-url@h/d?sslmode=sometimes", "postgres://u:secret-in-url@h/d?connect_timeout=3",
        ] {
            let found = problems(secrets + #"{"postgresURL": "\#(bad)"\#(keys)}}"#)
            #expect(found.map(\.path) == ["$.storage.postgresURL"], "\(bad)")
            #expect(!found.map(\.reason).joined().contains("secret-in-url"))
        }
        let fromEnvironment = try ConfigurationSource.environment.load(environment: [
            "KORAIDV_WEBHOOK_SECRET": "w", "KORA_SIDECAR_DATABASE_URL": "postgres://kora@127.0.0.1/kora",
            "KORA_SIDECAR_ENCRYPTION_KEY": TestSecrets.encryptionKey,
        ])
        #expect(fromEnvironment.storage.postgresURL?.value == "postgres://kora@127.0.0.1/kora")
        #expect(fromEnvironment.storage.encryptionKeys.map(\.id).allSatisfy { $0.hasPrefix("env-") && $0.count == 12 })
    }

    @Test func storedBodiesNeedAKeyReplicasShareAndKeysAreCheckedWithoutQuotingThem() throws {
        let secrets = #"{"webhooks": {"secrets": ["w"]}, "storage": "#
        // PostgreSQL replicas must seal with one key: without one, the configuration is refused.
        let missing = problems(secrets + #"{"postgresURL": "postgres://u@h/d"}}"#)
        #expect(missing.map(\.path) == ["$.storage.encryption.keys"])
        #expect(missing[0].reason.contains("every replica must seal with the same key"))
        let environment = problemsFromEnvironment([
            "KORAIDV_WEBHOOK_SECRET": "w", "KORA_SIDECAR_DATABASE_URL": "postgres://kora@127.0.0.1/kora",
        ])
        #expect(environment.map(\.path) == ["KORA_SIDECAR_ENCRYPTION_KEY"])
        // Each key: an id, 32 bytes in base64; ids unique. The key itself never appears in a problem.
        let short = "c2hvcnQta2V5LXNlY3JldC12YWx1ZQ=="
        let found = problems(
            secrets + #"{"encryption": {"keys": [{"id": "a", "key": "\#(short)"}, {"id": "a", "key": "\#(TestSecrets.encryptionKey)"}, {"id": "b c", "key": "\#(TestSecrets.encryptionKey)"}, {"id": "d"}]}}}"#)
        #expect(
            found.map(\.path) == [
                "$.storage.encryption.keys[0].key", "$.storage.encryption.keys[1].id", "$.storage.encryption.keys[2].id",
                "$.storage.encryption.keys[3].key",
            ])
        #expect(!found.map(\.reason).joined().contains(short))
        #expect(problems(secrets + #"{"encryption": {"keys": []}}}"#).map(\.path) == ["$.storage.encryption.keys"])
        // Retentions are durations; check-config shows the key ids, never the keys.
        let configuration = try load(
            secrets + #"{"payloadRetention": "0s", "deadRetention": "30d", "encryption": {"keys": [{"id": "2026-11", "key": "\#(TestSecrets.encryptionKey)"}]}}}"#)
        #expect(configuration.storage.payloadRetention == .zero)
        #expect(configuration.storage.deadRetention == .seconds(30 * 86_400))
        let text = JSONWriter.prettyString(configuration.effectiveJSON)
        #expect(text.contains(#""id": "2026-11""#) && !text.contains(TestSecrets.encryptionKey))
        #expect(problems(secrets + #"{"payloadRetention": "1y"}}"#).map(\.path) == ["$.storage.payloadRetention"])
        // Without keys, SQLite uses the key file beside the store.
        #expect(try load(secrets + #"{"sqlitePath": "/var/lib/k/s.sqlite"}}"#).storage.keyFilePath == "/var/lib/k/s.sqlite.key")
    }

    @Test func theExampleFileIsValid() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let environment = [
            "KORAIDV_API_KEY": "k", "KORAIDV_TENANT_ID": "t", "KORAIDV_WEBHOOK_SECRET": "w", "KORAIDV_WEBHOOK_SECRET_PREVIOUS": "w0",
            "KORA_SIDECAR_ADMIN_TOKEN": "a", "APP_SIDECAR_TOKEN": "s", "APP_WEBHOOK_SECRET": TestSecrets.signing, "APP_KEY": "x",
            "BILLING_SIDECAR_TOKEN": "b", "BILLING_WEBHOOK_SECRET": TestSecrets.signing,
        ]
        let configuration = try SidecarConfiguration.load(file: root.path + "/config.example.json", environment: environment)
        #expect(!configuration.services.isEmpty)
    }

    @Test func theEnvironmentAloneBuildsOneService() throws {
        let environment = [
            "KORAIDV_API_KEY": "live_k", "KORAIDV_TENANT_ID": "tenant", "KORAIDV_WEBHOOK_SECRET": "whsec_w",
            "KORA_SIDECAR_FORWARD_SOCKET": "/run/app.sock", "KORA_SIDECAR_CALLBACK_URL": "https://hooks.example.com/k",
            "KORA_SIDECAR_SIGNING_SECRET": TestSecrets.signing, "KORA_SIDECAR_WEBHOOK_PORT": "9090", "KORA_SIDECAR_DELIVERY_MODE": "direct",
        ]
        let configuration = try ConfigurationSource.environment.load(environment: environment)
        #expect(configuration.kora.apiKey?.value == "live_k")
        #expect(configuration.kora.tenantId?.value == "tenant")
        #expect(configuration.kora.callbackURL == "https://hooks.example.com/k")
        #expect(configuration.webhooks.secrets.map(\.value) == ["whsec_w"])
        #expect(configuration.webhooks.listen == .tcp(host: "0.0.0.0", port: 9090))
        #expect(configuration.delivery.mode == .direct)
        let service = try #require(configuration.services.first)
        #expect(service.name == "app")
        #expect(service.deliver?.target == .unixSocket(socketPath: "/run/app.sock", path: "/kora-events"))
        #expect(service.deliver?.signingSecret?.value == TestSecrets.signing)

        #expect(throws: ConfigurationError.self) { try ConfigurationSource.environment.load(environment: [:]) }
        let bad = ["KORAIDV_WEBHOOK_SECRET": "w", "KORA_SIDECAR_WEBHOOK_PORT": "eighty"]
        #expect(throws: ConfigurationError.self) { try ConfigurationSource.environment.load(environment: bad) }
    }

    @Test func theSourceFollowsFlagThenVariable() {
        #expect(ConfigurationSource.resolve(flag: "a.json", environment: ["KORA_SIDECAR_CONFIG": "b.json"]) == .file("a.json"))
        #expect(ConfigurationSource.resolve(flag: nil, environment: ["KORA_SIDECAR_CONFIG": "b.json"]) == .file("b.json"))
    }

    @Test(arguments: [("250ms", 250), ("5s", 5000), ("2m", 120_000), ("1h", 3_600_000), ("1d", 86_400_000)])
    func durationsParse(text: String, milliseconds: Int64) throws {
        let duration = try #require(DurationText.parse(text))
        #expect(duration.milliseconds == milliseconds)
        #expect(DurationText.format(duration) == text)
    }

    @Test(arguments: ["", "5", "s", "-5s", "5 s", "1.5s", "5sec", "99999999999999h",
        // Found by FuzzDuration in CI: twelve digits of days overflowed the milliseconds and trapped.
        "999999999999d", "106751991168d"])
    func badDurationsAreRejected(text: String) {
        #expect(DurationText.parse(text) == nil)
    }

    @Test func timesAreReadInEveryRFC3339Form() {
        let noon = UnixTime(milliseconds: 1_764_504_000_000)  // 2025-11-30T12:00:00Z
        for text in ["2025-11-30T12:00:00Z", "2025-11-30t12:00:00z", "2025-11-30 12:00:00Z", "2025-11-30T13:00:00+01:00", "2025-11-30T10:30:00-01:30"] {
            #expect(UnixTime.parse(text, now: noon) == noon, "\(text)")
        }
        for text in ["2025-11-30T12:00:00.250Z", "2025-11-30T12:00:00.25Z", "2025-11-30T12:00:00.250999+00:00"] {
            #expect(UnixTime.parse(text, now: noon)?.milliseconds == noon.milliseconds + 250, "\(text)")
        }
        #expect(UnixTime.parse("2025-11-30", now: noon) == UnixTime(milliseconds: noon.milliseconds - 12 * 3_600_000))
        for text in ["2025-11-30T12:00:00", "2025-11-30T12:00:00.Z", "2025-11-30T12:00:00+1", "2025-11-30T12:00:00+01:00Z", "2025-11-30T12:00:00ZZ", "2025-11-30T25:00:00Z"] {
            #expect(UnixTime.parse(text, now: noon) == nil, "\(text)")
        }
        // A day the month does not have is no date (it was read as one a few days into the next month).
        for text in ["2026-02-29", "2026-02-31", "2025-04-31T00:00:00Z", "1900-02-29", "2026-11-00"] {
            #expect(UnixTime.parse(dateOrTime: text) == nil, "\(text)")
        }
        for text in ["2024-02-29", "2000-02-29", "2026-01-31", "2026-12-31T23:59:59Z"] {
            #expect(UnixTime.parse(dateOrTime: text) != nil, "\(text)")
        }
    }

    @Test func eventFiltersMatchFamiliesAndNames() {
        let filter = EventFilter(["verification.*", "fraud_alert.created"])
        #expect(filter.matches("verification.completed"))
        #expect(filter.matches("fraud_alert.created"))
        #expect(!filter.matches("fraud_alert.resolved"))
        #expect(!filter.matches("verificationX"))
        #expect(EventFilter.all.matches("anything"))
    }

    @Test func allowPatternsMatchSegments() throws {
        let get = try #require(AllowPattern("GET /verifications/*"))
        #expect(get.matches(method: "GET", path: "/verifications/ver_1"))
        #expect(!get.matches(method: "GET", path: "/verifications/ver_1/images"))
        #expect(!get.matches(method: "POST", path: "/verifications/ver_1"))
        let rest = try #require(AllowPattern("* /verifications/**"))
        #expect(rest.matches(method: "DELETE", path: "/verifications/a/b/c"))
        #expect(!rest.matches(method: "GET", path: "/verifications"))
        #expect(AllowPattern("GET") == nil)
        #expect(AllowPattern("GET verifications") == nil)
        #expect(AllowPattern("GET /**/x") == nil)
    }
}
