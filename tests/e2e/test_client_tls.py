"""The bundled client verifies a wss:// server's certificate.

A real server listens with TLS (a certificate for 127.0.0.1 from a CA the
test makes) on the port clients are sent to, and plain HTTP on another for
pre-connection.  The client connects when it trusts that CA, and refuses the
server when it trusts only the system's store or another CA (Autobahn's own
default would accept any certificate).
"""

from __future__ import annotations

import shutil
import tempfile

from OpenSSL.SSL import Error as TLSError
from twisted.internet import reactor
from twisted.internet.ssl import Certificate
from twisted.trial.unittest import TestCase

from allspark.client import open_socket
from tests.e2e.helpers import pre_connect
from tests.e2e.test_mesh import make_ca, make_server_cert
from tests.support import ServerProcess, free_port, key


def trust(ca_pem_path: str) -> Certificate:
    with open(ca_pem_path, "rb") as f:
        return Certificate.loadPEM(f.read())


class ClientTLSTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="allspark-client-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.ca, self.other_ca = make_ca(directory, "ca"), make_ca(directory, "other-ca")
        cert, key_path = make_server_cert(directory, self.ca, "server")
        tls_port = free_port()
        server = ServerProcess(args=(f"--port={tls_port}", f"--listen=ssl:{tls_port}:interface=127.0.0.1:"
                                     f"privateKey={key_path}:certKey={cert}"))
        server.args = (*server.args, f"--listen=tcp:{server.port}:interface=127.0.0.1")
        self.addCleanup(shutil.rmtree, server.data_dir, True)
        self.addCleanup(server.stop)
        self.server = server.start()

    def ws_url(self, node_id: str) -> str:
        url: str = pre_connect(self.server, {"auth_key": key(node_id)}).json()["node"]["ws_url"]
        self.assertTrue(url.startswith("wss://127.0.0.1:"), url)
        return url

    async def test_a_client_that_trusts_the_ca_connects(self) -> None:
        client = await open_socket(reactor, self.ws_url("alice"), tls_trust=trust(self.ca[2]))
        self.addCleanup(client.close)
        self.assertEqual((await client.ping())["op"], "pong")

    async def test_a_certificate_from_an_untrusted_ca_is_refused(self) -> None:
        for tls_trust in (None, trust(self.other_ca[2])):  # the system's store, another CA
            with self.assertRaises(Exception) as refused:
                await open_socket(reactor, self.ws_url("alice"), tls_trust=tls_trust)
            self.assertIn("certificate verify failed", str(refused.exception) + repr(refused.exception.__cause__),
                          refused.exception)
