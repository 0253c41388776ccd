@_spi(NBDMachines) import NBDCore
import NBDTLS
import Testing

@Suite("PSK files")
struct PSKFileTests {
    @Test func theUsersKeyIsReadAsHex() throws {
        let text = "bob:00ff\nalice:0123456789abcdefABCDEF\n"
        #expect(try PSKFile.key(of: "alice", in: text, path: "k") == [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xab, 0xcd, 0xef])
        #expect(try PSKFile.key(of: "bob", in: text, path: "k") == [0x00, 0xff])
    }

    /// The server reads every user's key: the first line of a user counts, as the client reads it.
    @Test func theServerReadsEveryUsersKey() throws {
        let keys = try PSKFile.keys(in: "bob:00ff\nalice:0a\n\nbob:11\n", path: "k")
        #expect(keys == ["bob": [0x00, 0xff], "alice": [0x0a]])
        for (text, message) in [
            ("", "holds no key"), ("alice\n", "line 1"), (":00\n", "line 1"), ("bob:00\nalice:zz\n", "not hexadecimal"),
        ] {
            #expect { try PSKFile.keys(in: text, path: "keys.psk") } throws: { error in
                (error as? NBDError)?.message.contains(message) == true
            }
        }
    }

    @Test(arguments: [
        ("alice:+f\n", "not hexadecimal"), ("alice:0g\n", "not hexadecimal"), ("alice:abc\n", "not hexadecimal"),
        ("alice:\n", "is empty"), ("bob:00\n", "no PSK for user alice"), ("", "no PSK for user alice"),
    ])
    func badFilesGiveTypedErrors(text: String, message: String) {
        #expect { try PSKFile.key(of: "alice", in: text, path: "keys.psk") } throws: { error in
            guard let error = error as? NBDError else { return false }
            return error.code == .tlsFailed && error.message.contains(message)
        }
    }
}
