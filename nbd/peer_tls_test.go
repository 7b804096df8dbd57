package nbd

import (
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blockd/graph"
	"blockd/internal/tlscreds/tlstest"
)

// TestPeerTLSCerttoolRSA: credentials made with certtool as QEMU's TLS
// documentation shows (RSA-3072 keys), verify-peer on. nbdinfo (libnbd) and
// qemu-io load their client certificate from files, and GnuTLS before
// 3.8.13 then sent none under TLS 1.3 while the server's CertificateRequest
// listed CA names (the server offers only rsa_pss_rsae_* for RSA there).
// Clients without a certificate, or with one from another CA, are refused.
func TestPeerTLSCerttoolRSA(t *testing.T) {
	needTool(t, "certtool")
	needTool(t, "nbdinfo")
	needTool(t, "qemu-io")
	dir := t.TempDir()
	if err := tlstest.Certtool(dir); err != nil {
		t.Fatal(err)
	}
	// A client certificate from another CA, next to the right CA file.
	foreign := t.TempDir()
	if err := tlstest.Certtool(foreign); err != nil {
		t.Fatal(err)
	}
	copyTo(t, filepath.Join(dir, "ca-cert.pem"), filepath.Join(foreign, "ca-cert.pem"))
	nocert := t.TempDir()
	copyTo(t, filepath.Join(dir, "ca-cert.pem"), filepath.Join(nocert, "ca-cert.pem"))

	for _, v := range []struct {
		name string
		vers uint16
	}{{"tls1.3", tls.VersionTLS13}, {"tls1.2", tls.VersionTLS12}} {
		t.Run(v.name, func(t *testing.T) {
			srvCfg, _ := tlsFixtureDir(t, dir, true)
			srvCfg.MinVersion, srvCfg.MaxVersion = v.vers, v.vers
			m := graph.NewMemNode(4 << 20)
			_, sock := peerServer(t, Options{TLSConfig: srvCfg}, &Export{Name: "disk", Node: m})
			tlsURI := func(d string) string { return "nbds+unix:///disk?socket=" + sock + "&tls-certificates=" + d }

			if out := strings.TrimSpace(run(t, "nbdinfo", "--size", tlsURI(dir))); out != "4194304" {
				t.Fatalf("nbdinfo over TLS: %q", out)
			}
			if out, err := runErr(t, "nbdinfo", "--size", tlsURI(nocert)); err == nil {
				t.Fatalf("nbdinfo without a client certificate accepted: %s", out)
			}
			if out, err := runErr(t, "nbdinfo", "--size", tlsURI(foreign)); err == nil {
				t.Fatalf("nbdinfo with a certificate from another CA accepted: %s", out)
			}

			qemuIO := func(d string, cmds ...string) (string, error) {
				args := []string{"--object", "tls-creds-x509,id=tls0,endpoint=client,dir=" + d, "--image-opts"}
				for _, c := range cmds {
					args = append(args, "-c", c)
				}
				args = append(args, "driver=nbd,server.type=unix,server.path="+sock+",export=disk,tls-creds=tls0,tls-hostname=localhost")
				return runErr(t, "qemu-io", args...)
			}
			out, err := qemuIO(dir, "write -P 0x6b 0 1M", "read -P 0x6b 0 1M")
			if err != nil || strings.Contains(out, "fail") || strings.Contains(out, "can't open") {
				t.Fatalf("qemu-io over TLS: %v\n%s", err, out)
			}
			if m.Bytes()[1<<20-1] != 0x6b {
				t.Fatal("qemu-io's write over TLS is not in the node")
			}
			for _, d := range []string{nocert, foreign} {
				if out, err := qemuIO(d, "read 0 4k"); err == nil && !strings.Contains(out, "can't open") {
					t.Fatalf("qemu-io with credentials %s accepted: %s", d, out)
				}
			}
		})
	}
}

func copyTo(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
