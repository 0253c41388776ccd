import NIOCore
import Testing

@testable import NBDServer

/// Serving off loopback without TLS required is said at start; loopback, a Unix socket or TLS
/// required are not warned about.
@Suite("Clear text off loopback")
struct ClearTextExposureTests {
    static let local = ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"]
    static let reachable = ["0.0.0.0", "::", "192.0.2.7", "2001:db8::1", "::ffff:192.0.2.7"]

    func address(_ ip: String) throws -> SocketAddress { try SocketAddress(ipAddress: ip, port: 10809) }

    @Test func loopbackAndUnixSocketsAreNotWarnedAbout() throws {
        for ip in Self.local {
            #expect(ClearTextExposure.warning(listeningOn: try address(ip), tls: nil) == nil, "\(ip)")
        }
        let unix = try SocketAddress(unixDomainSocketPath: "/tmp/nbd.sock")
        #expect(ClearTextExposure.warning(listeningOn: unix, tls: nil) == nil)
    }

    @Test func everyOtherAddressIsWarnedAboutUnlessTLSIsRequired() throws {
        for ip in Self.reachable {
            let warning = try #require(ClearTextExposure.warning(listeningOn: try address(ip), tls: nil), "\(ip)")
            #expect(warning.contains("serving \(ip) port 10809 in clear") && warning.contains("--tls=require"), "\(warning)")
            for mode in [NBDServerTLSMode.off, .on] {
                let tls = NBDServerTLSConfiguration(mode: mode, pskFile: "keys.psk")
                #expect(ClearTextExposure.warning(listeningOn: try address(ip), tls: tls) != nil, "\(ip) \(mode)")
            }
            let required = NBDServerTLSConfiguration(mode: .require, pskFile: "keys.psk")
            #expect(ClearTextExposure.warning(listeningOn: try address(ip), tls: required) == nil, "\(ip)")
        }
    }

    @Test func aWildcardIsDialledOnLoopback() {
        #expect(ClearTextExposure.loopback(forWildcard: "0.0.0.0") == "127.0.0.1")
        #expect(ClearTextExposure.loopback(forWildcard: "::") == "::1")
        #expect(ClearTextExposure.loopback(forWildcard: "192.0.2.7") == nil)
    }
}
