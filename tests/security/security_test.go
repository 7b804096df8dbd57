// Package security checks blockd's locked-down defaults: no secret or key
// appears in logs (at debug level), QMP replies, errors, events or query
// output; monitor and NBD unix sockets are created 0600 whatever the
// umask; nothing listens on TCP unless asked, and then only where asked;
// the NBD server enforces max-connections and a handshake timeout.
package security

import (
	"bufio"
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"blockd/internal/testutil"
	"blockd/tests/harness"
)

var blockdBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "blockd-security")
	if err != nil {
		panic(err)
	}
	blockdBin, err = harness.Build(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// secretText returns a fresh random passphrase that cannot occur by chance.
func secretText(label string) string {
	b := make([]byte, 12)
	rand.Read(b)
	return label + "-" + hex.EncodeToString(b)
}

// forms lists the encodings under which a secret might leak.
func forms(secret []byte) map[string][]byte {
	j, _ := json.Marshal(string(secret))
	f := map[string][]byte{
		"raw":          secret,
		"hex":          []byte(hex.EncodeToString(secret)),
		"HEX":          []byte(strings.ToUpper(hex.EncodeToString(secret))),
		"base64":       []byte(base64.StdEncoding.EncodeToString(secret)),
		"base64 (raw)": []byte(base64.RawStdEncoding.EncodeToString(secret)),
		"base64 (url)": []byte(base64.RawURLEncoding.EncodeToString(secret)),
		"json":         j[1 : len(j)-1],
	}
	// Hex dumps with spaces, as cryptsetup prints keys.
	var sp []string
	for _, b := range secret {
		sp = append(sp, fmt.Sprintf("%02x", b))
	}
	f["hex dump"] = []byte(strings.Join(sp, " "))
	return f
}

// scan reports every form of every secret found in data.
func scan(t *testing.T, where string, data []byte, secrets map[string][]byte) {
	t.Helper()
	for name, s := range secrets {
		for form, needle := range forms(s) {
			if len(needle) < 8 {
				continue
			}
			if i := bytes.Index(data, needle); i >= 0 {
				lo, hi := max(0, i-80), min(len(data), i+len(needle)+80)
				t.Errorf("%s contains secret %q (%s form): ...%s...", where, name, form, data[lo:hi])
			}
		}
	}
}

func writeFile(t *testing.T, path string, b []byte) string {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// volumeKey asks cryptsetup for a LUKS volume key.
func volumeKey(t *testing.T, dev, header, passFile string) []byte {
	t.Helper()
	vk := filepath.Join(t.TempDir(), "vk")
	args := []string{"luksDump", "-q", "--dump-volume-key", "--volume-key-file", vk, "--key-file", passFile}
	if header != "" {
		args = append(args, "--header", header)
	}
	testutil.Run(t, "cryptsetup", append(args, dev)...)
	b, err := os.ReadFile(vk)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func luksFormat(t *testing.T, img, passFile string) {
	t.Helper()
	writeFile(t, img, nil)
	if err := os.Truncate(img, 6<<20); err != nil {
		t.Fatal(err)
	}
	testutil.Run(t, "cryptsetup", "luksFormat", "-q", "--type", "luks1", "--pbkdf-force-iterations", "1000", "--key-file", passFile, img)
}

// TestNoSecretsInOutput runs a scripted session that uses secrets in every
// way blockd accepts them (command line data= and file=, QMP data, base64,
// AES-encrypted with keyid/iv, amend new/old secrets, wrong passphrases,
// malformed requests) and scans the daemon's debug log and every byte the
// monitor received for every passphrase and LUKS volume key.
func TestNoSecretsInOutput(t *testing.T) {
	testutil.NeedTool(t, "cryptsetup")
	dir := t.TempDir()
	sec := map[string][]byte{}
	pass := func(name string) string {
		s := secretText(name)
		sec[name] = []byte(s)
		return s
	}
	passFile, passCmd, passData, passB64 := pass("file"), pass("cmdline"), pass("data"), pass("b64")
	passEnc, passNew, passWrong, passDup := pass("enc"), pass("new"), pass("wrong"), pass("dup")
	passTypo, passParse, passBad := pass("typo"), pass("parse"), pass("badb64")
	masterKey := make([]byte, 32)
	rand.Read(masterKey)
	sec["master key"] = masterKey

	pwFile := writeFile(t, filepath.Join(dir, "pw-file"), []byte(passFile))
	imgA, imgC := filepath.Join(dir, "a.img"), filepath.Join(dir, "c.img")
	luksFormat(t, imgA, pwFile)
	pwEnc := writeFile(t, filepath.Join(dir, "pw-enc"), []byte(passEnc))
	luksFormat(t, imgC, pwEnc)
	sec["volume key A"] = volumeKey(t, imgA, "", pwFile)
	sec["volume key C"] = volumeKey(t, imgC, "", pwEnc)

	sock := filepath.Join(dir, "nbd.sock")
	d := harness.StartDaemonIn(t, blockdBin, dir, "--log-level", "debug",
		"--object", "secret,id=scmd,data="+passCmd,
		"--object", "secret,id=sfile,file="+pwFile,
		"--blockdev", fmt.Sprintf(`{"driver":"luks","node-name":"a","key-secret":"sfile","file":{"driver":"file","filename":%q}}`, imgA),
		"--nbd-server", "addr.type=unix,addr.path="+sock,
		"--export", "type=nbd,id=ea,node-name=a,name=a,writable=on")
	q := d.Mon
	must := func(cmd string, args map[string]any) { t.Helper(); harness.Must(t, q, cmd, args) }
	fail := func(cmd string, args map[string]any, want string) {
		t.Helper()
		harness.MustFail(t, q, cmd, args, want)
	}
	job := func(cmd string, args map[string]any) string {
		t.Helper()
		e, err := harness.RunJob(q, cmd, args, 60*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	secret := func(id string, extra map[string]any) map[string]any {
		m := map[string]any{"qom-type": "secret", "id": id}
		for k, v := range extra {
			m[k] = v
		}
		return m
	}

	// Secrets over QMP, in every format.
	must("object-add", secret("sdata", map[string]any{"data": passData}))
	must("object-add", secret("sb64", map[string]any{"data": base64.StdEncoding.EncodeToString([]byte(passB64)), "format": "base64"}))
	must("object-add", secret("mk", map[string]any{"data": base64.StdEncoding.EncodeToString(masterKey), "format": "base64"}))
	iv := make([]byte, 16)
	rand.Read(iv)
	pt := []byte(passEnc)
	pad := 16 - len(pt)%16
	pt = append(pt, bytes.Repeat([]byte{byte(pad)}, pad)...)
	block, _ := aes.NewCipher(masterKey)
	ct := make([]byte, len(pt))
	cipher.NewCBCEncrypter(block, iv).CryptBlocks(ct, pt)
	must("object-add", secret("senc", map[string]any{"data": base64.StdEncoding.EncodeToString(ct), "format": "base64",
		"keyid": "mk", "iv": base64.StdEncoding.EncodeToString(iv)}))
	must("object-add", secret("snew", map[string]any{"data": passNew}))
	must("object-add", secret("swrong", map[string]any{"data": passWrong}))
	// Failing object-adds that carry secrets.
	fail("object-add", secret("sdata", map[string]any{"data": passDup}), "attempt to add duplicate property 'sdata'")
	fail("object-add", secret("sbad", map[string]any{"data": passBad + "!*", "format": "base64"}), "")
	fail("object-add", secret("snoiv", map[string]any{"data": base64.StdEncoding.EncodeToString(ct), "format": "base64", "keyid": "mk"}), "IV is required")
	fail("object-add", secret("sbadkey", map[string]any{"data": base64.StdEncoding.EncodeToString(ct), "format": "base64",
		"keyid": "nosuch", "iv": base64.StdEncoding.EncodeToString(iv)}), "nosuch")
	fail("object-add", secret("styped", map[string]any{"dat": passTypo}), "")
	fail("object-add", secret("sboth", map[string]any{"data": passTypo, "file": pwFile}), "mutually exclusive")
	// A malformed request with a secret in it: one parse error, nothing
	// executed.
	if r, err := q.SendRaw([]byte(`{"execute":"object-add","arguments":{"qom-type":"secret","id":"sp","data":"` + passParse + `" "y"}}` + "\n")); err != nil || !bytes.Contains(r, []byte("error")) {
		t.Fatalf("malformed request: %s %v", r, err)
	}
	must("query-version", nil)

	// A LUKS2 volume with a detached header made by blockd.
	hdrB, dataB := filepath.Join(dir, "b.hdr"), filepath.Join(dir, "b.img")
	for i, f := range []string{hdrB, dataB} {
		if e := job("blockdev-create", map[string]any{"job-id": fmt.Sprintf("cf%d", i), "options": map[string]any{"driver": "file", "filename": f, "size": 0}}); e != "" {
			t.Fatal(e)
		}
	}
	must("blockdev-add", map[string]any{"driver": "file", "node-name": "hb", "filename": hdrB})
	must("blockdev-add", map[string]any{"driver": "file", "node-name": "db", "filename": dataB})
	if e := job("blockdev-create", map[string]any{"job-id": "cl", "options": map[string]any{"driver": "luks", "header": "hb", "file": "db",
		"size": 4 << 20, "key-secret": "sdata", "luks-version": 2, "pbkdf": "pbkdf2", "iter-time": 10}}); e != "" {
		t.Fatal(e)
	}
	if e := job("blockdev-create", map[string]any{"job-id": "cbad", "options": map[string]any{"driver": "luks", "header": "hb",
		"size": 0, "key-secret": "nosuch"}}); !strings.Contains(e, "nosuch") {
		t.Fatalf("create with a missing secret: %q", e)
	}
	must("blockdev-add", map[string]any{"driver": "luks", "node-name": "b", "file": "db", "header": "hb", "key-secret": "sdata"})
	// Keyslots: add two, erase by passphrase, fail an erase.
	amend := func(id string, opts map[string]any) string {
		opts["driver"] = "luks"
		return job("x-blockdev-amend", map[string]any{"job-id": id, "node-name": "b", "options": opts})
	}
	for i, s := range []string{"snew", "sb64"} {
		if e := amend(fmt.Sprintf("am%d", i), map[string]any{"state": "active", "new-secret": s, "iter-time": 10, "pbkdf": "pbkdf2"}); e != "" {
			t.Fatal(e)
		}
	}
	if e := amend("am2", map[string]any{"state": "inactive", "old-secret": "snew"}); e != "" {
		t.Fatal(e)
	}
	if e := amend("am3", map[string]any{"state": "inactive", "old-secret": "swrong"}); e == "" {
		t.Fatal("erasing with a wrong passphrase succeeded")
	}
	if e := amend("am4", map[string]any{"state": "active", "new-secret": "snew", "secret": "swrong", "iter-time": 10}); e == "" {
		t.Fatal("adding a keyslot unlocked with a wrong passphrase succeeded")
	}
	pwData := writeFile(t, filepath.Join(dir, "pw-data"), []byte(passData))
	sec["volume key B"] = volumeKey(t, dataB, hdrB, pwData)

	// Wrong and right passphrases for image C, the right one AES-encrypted.
	fail("blockdev-add", map[string]any{"driver": "luks", "node-name": "c", "key-secret": "swrong", "file": map[string]any{"driver": "file", "filename": imgC}}, "")
	must("blockdev-add", map[string]any{"driver": "luks", "node-name": "c", "key-secret": "senc", "file": map[string]any{"driver": "file", "filename": imgC}})
	must("block-export-add", map[string]any{"type": "nbd", "id": "eb", "node-name": "b", "name": "b", "writable": true, "description": "volume b"})
	for _, name := range []string{"a", "b"} {
		c, err := harness.DialNBD("unix", sock, name)
		if err != nil {
			t.Fatal(err)
		}
		p := bytes.Repeat([]byte(name), 4096)
		if err := c.WriteAt(p, 0, true); err != nil {
			t.Fatal(err)
		}
		if got, err := c.Read(0, 4096); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("export %s: %v", name, err)
		}
		c.Close()
	}
	// Every query.
	for _, qc := range []struct {
		cmd  string
		args map[string]any
	}{
		{"query-named-block-nodes", map[string]any{"flat": true}}, {"query-named-block-nodes", nil}, {"query-block", nil},
		{"query-block-exports", nil}, {"query-jobs", nil}, {"query-commands", nil}, {"query-version", nil},
	} {
		must(qc.cmd, qc.args)
	}
	must("block-export-del", map[string]any{"id": "eb", "mode": "hard"})
	if _, err := q.WaitEvent("BLOCK_EXPORT_DELETED", func(ev harness.Event) bool { return ev.Data["id"] == "eb" }, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"b", "c", "hb", "db"} {
		must("blockdev-del", map[string]any{"node-name": n})
	}
	for _, id := range []string{"sdata", "sb64", "senc", "mk", "snew", "swrong"} {
		must("object-del", map[string]any{"id": id})
	}
	if err := d.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}

	transcript, logs := q.Transcript(), []byte(d.Logs())
	// The scan sees query output: the image paths are there.
	if !bytes.Contains(transcript, []byte(imgC)) || !bytes.Contains(transcript, []byte(`key-secret\": \"senc`)) {
		t.Fatal("the transcript does not hold the query output the scan relies on")
	}
	if !bytes.Contains(logs, []byte("level=debug")) {
		t.Fatalf("the daemon did not log at debug level:\n%s", logs)
	}
	scan(t, "the QMP transcript", transcript, sec)
	scan(t, "the daemon log", logs, sec)
	t.Logf("scanned %d bytes of QMP output and %d bytes of debug log for %d secrets in %d encodings each",
		len(transcript), len(logs), len(sec), len(forms(nil)))
}

// TestCommandLineErrorsHideSecrets: a failing --object prints the option
// and the error, as QEMU does, but with the secret's data replaced by
// <redacted> (QEMU echoes it); also when the data holds a comma, which
// keyval then takes for a parameter name that the error names, and in JSON
// form, well-formed or not. The same failures over QMP echo nothing either.
func TestCommandLineErrorsHideSecrets(t *testing.T) {
	secrets := map[string][]byte{}
	for i, tc := range []struct {
		arg  func(s string) string
		want string // part of the error that must still be shown
	}{
		{func(s string) string { return "secret,id=s0,data=" + s + ",keyid=nosuch,iv=AAAAAAAAAAAAAAAAAAAAAA==" }, "No secret with id 'nosuch'"},
		{func(s string) string { return "secret,id=s0,data=" + s[:10] + "," + s[10:] + ",format=raw" }, "parameter '<redacted>'"},
		{func(s string) string { return "secret,id=s0,data=" + s[:10] + "," + s[10:] + "=1" }, "<redacted>"},
		{func(s string) string { return "secret,id=s0,data=" + s + ",format=base64" }, "secret,id=s0,data=<redacted>,format=base64"},
		{func(s string) string {
			return `{"qom-type":"secret","id":"s0","data":"` + s + `","keyid":"nosuch","iv":"AAAAAAAAAAAAAAAAAAAAAA=="}`
		}, "No secret with id 'nosuch'"},
		{func(s string) string { return `{"qom-type":"secret","id":"s0","data":"` + s + `\q"}` }, "JSON parse error"},
	} {
		s := secretText(fmt.Sprintf("cmdline%d", i))
		secrets[fmt.Sprintf("case %d", i)] = []byte(s)
		p, err := harness.Start(blockdBin, t.TempDir(), "--object", tc.arg(s))
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-p.Done():
		case <-time.After(30 * time.Second):
			t.Fatalf("case %d: blockd did not exit", i)
		}
		logs := p.Logs()
		if !strings.Contains(logs, "blockd: --object") || !strings.Contains(logs, tc.want) {
			t.Errorf("case %d: error output %q lacks %q", i, logs, tc.want)
		}
		scan(t, fmt.Sprintf("stderr of case %d", i), []byte(logs), map[string][]byte{"secret": []byte(s)})
		// The pieces of a split secret must not appear either.
		for _, piece := range []string{s[:10], s[10:]} {
			if strings.Contains(logs, piece) {
				t.Errorf("case %d: a piece of the secret (%q) is in the error output: %s", i, piece, logs)
			}
		}
	}

	// The same mistakes over QMP.
	d := harness.StartDaemonIn(t, blockdBin, t.TempDir())
	qs := map[string][]byte{}
	for i, args := range []func(s string) map[string]any{
		func(s string) map[string]any {
			return map[string]any{"data": s, "keyid": "nosuch", "iv": "AAAAAAAAAAAAAAAAAAAAAA=="}
		},
		func(s string) map[string]any { return map[string]any{"data": s, "format": "base64"} },
		func(s string) map[string]any { return map[string]any{"data": s, "format": s} },
		func(s string) map[string]any { return map[string]any{"data": s, s: "x"} },
		func(s string) map[string]any { return map[string]any{"data": map[string]any{s: s}} },
		func(s string) map[string]any { return map[string]any{"data": []any{s}} },
		func(s string) map[string]any { return map[string]any{"data": s[:10] + "," + s[10:], "loaded": true} },
	} {
		s := secretText(fmt.Sprintf("qmp%d", i))
		qs[fmt.Sprintf("qmp case %d", i)] = []byte(s)
		a := args(s)
		a["qom-type"], a["id"] = "secret", fmt.Sprintf("q%d", i)
		d.MustFail("object-add", a, "")
	}
	d.Must("query-version", nil)
	scan(t, "QMP transcript", d.Mon.Transcript(), qs)
}

// listeningSockets returns the local addresses ("tcp 0100007F:1F90") of
// the process's TCP and UDP sockets.
func inetSockets(t *testing.T, pid int) []string {
	t.Helper()
	inodes := map[string]bool{}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Skipf("cannot read the daemon's descriptors: %v", err)
	}
	for _, fd := range fds {
		l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if strings.HasPrefix(l, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	var out []string
	for _, proto := range []string{"tcp", "tcp6", "udp", "udp6"} {
		f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, proto))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) > 9 && inodes[fields[9]] {
				out = append(out, proto+" "+fields[1]+" state "+fields[3])
			}
		}
		f.Close()
	}
	return out
}

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeSocket == 0 {
		t.Fatalf("%s is not a socket", path)
	}
	return st.Mode().Perm()
}

// TestSocketsAndListeners runs blockd under umask 000 and checks that its
// monitor and NBD unix sockets are 0600, that it has no TCP or UDP socket
// unless asked, and that an inet NBD server binds only the address given.
func TestSocketsAndListeners(t *testing.T) {
	dir := t.TempDir()
	wrapper := writeFile(t, filepath.Join(dir, "blockd-umask0"), []byte("#!/bin/sh\numask 000\nexec "+blockdBin+` "$@"`+"\n"))
	os.Chmod(wrapper, 0o700)
	d := harness.StartDaemonIn(t, wrapper, dir, "--qmp", "unix:"+filepath.Join(dir, "qmp2.sock"),
		"--nbd-server", "addr.type=unix,addr.path="+filepath.Join(dir, "nbd.sock"))
	for _, s := range []string{"qmp.sock", "qmp2.sock", "nbd.sock"} {
		if m := mode(t, filepath.Join(dir, s)); m != 0o600 {
			t.Errorf("%s has mode %o under umask 000, want 600", s, m)
		}
	}
	pid := d.Cmd.Process.Pid
	if s := inetSockets(t, pid); len(s) != 0 {
		t.Errorf("blockd has inet sockets without being asked: %v", s)
	}
	d.Must("nbd-server-stop", nil)
	d.Must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": filepath.Join(dir, "nbd2.sock")}}})
	if m := mode(t, filepath.Join(dir, "nbd2.sock")); m != 0o600 {
		t.Errorf("nbd2.sock (nbd-server-start) has mode %o, want 600", m)
	}
	d.Must("nbd-server-stop", nil)
	d.Must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "inet", "data": map[string]any{"host": "127.0.0.1", "port": "0"}}})
	s := inetSockets(t, pid)
	if len(s) != 1 || !strings.HasPrefix(s[0], "tcp 0100007F:") || !strings.HasSuffix(s[0], "state 0A") {
		t.Errorf("inet NBD server on 127.0.0.1: sockets %v, want one listener on 127.0.0.1", s)
	}
	d.Must("nbd-server-stop", nil)
	if s := inetSockets(t, pid); len(s) != 0 {
		t.Errorf("inet sockets left after nbd-server-stop: %v", s)
	}
}

// listenPort is the port of a listener line of inetSockets.
func listenPort(t *testing.T, line string) int {
	t.Helper()
	f := strings.Fields(line)
	_, hex, _ := strings.Cut(f[1], ":")
	p, err := strconv.ParseUint(hex, 16, 16)
	if err != nil {
		t.Fatalf("%q: %v", line, err)
	}
	return int(p)
}

// TestInetListenersBindWhatIsAsked: host=0.0.0.0 listens on IPv4 alone
// (no dual-stack IPv6 socket), for the QMP chardev and the NBD server, and
// host=:: with ipv4=off takes no IPv4 connection, as in QEMU.
func TestInetListenersBindWhatIsAsked(t *testing.T) {
	if l, err := net.Listen("tcp6", "[::1]:0"); err != nil {
		t.Skipf("no IPv6: %v", err)
	} else {
		l.Close()
	}
	d := harness.StartDaemon(t, blockdBin,
		"--chardev", "socket,id=m2,host=0.0.0.0,port=0,server=on,wait=off", "--monitor", "chardev=m2",
		"--nbd-server", "addr.type=inet,addr.host=0.0.0.0,addr.port=0")
	pid := d.Cmd.Process.Pid
	s := inetSockets(t, pid)
	if len(s) != 2 {
		t.Errorf("host=0.0.0.0 monitor and NBD server: sockets %v, want two", s)
	}
	for _, l := range s {
		if !strings.HasPrefix(l, "tcp 00000000:") || !strings.HasSuffix(l, "state 0A") {
			t.Errorf("host=0.0.0.0: socket %s, want IPv4 listeners on 0.0.0.0 only", l)
		}
	}
	d.Must("nbd-server-stop", nil)
	d.Must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "inet",
		"data": map[string]any{"host": "::", "port": "0", "ipv4": false}}})
	var v6 []string
	for _, l := range inetSockets(t, pid) {
		if strings.HasPrefix(l, "tcp6 ") {
			v6 = append(v6, l)
		}
	}
	if len(v6) != 1 || !strings.HasPrefix(v6[0], "tcp6 00000000000000000000000000000000:") {
		t.Fatalf("host=:: ipv4=off: IPv6 sockets %v, want one listener on ::", v6)
	}
	port := strconv.Itoa(listenPort(t, v6[0]))
	if c, err := net.DialTimeout("tcp", "[::1]:"+port, 5*time.Second); err != nil {
		t.Errorf("host=:: ipv4=off: IPv6 connection refused: %v", err)
	} else {
		c.Close()
	}
	if c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 5*time.Second); err == nil {
		c.Close()
		t.Errorf("host=:: ipv4=off: the socket takes IPv4 connections (not IPv6-only)")
	}
}

// TestSecretFileBounds: a secret file that is a device, or longer than
// 64 KiB, is refused at once, over QMP and on the command line (reading
// /dev/zero whole would run the daemon out of memory).
func TestSecretFileBounds(t *testing.T) {
	big := writeFile(t, filepath.Join(t.TempDir(), "big"), bytes.Repeat([]byte{'k'}, 64<<10+1))
	d := harness.StartDaemon(t, blockdBin)
	d.MustFail("object-add", map[string]any{"qom-type": "secret", "id": "z", "file": "/dev/zero"},
		"Unable to read /dev/zero: secret file “/dev/zero” is not a regular file or FIFO")
	d.MustFail("object-add", map[string]any{"qom-type": "secret", "id": "b", "file": big},
		"is larger than 65536 bytes")
	d.Must("query-version", nil)

	p, err := harness.Start(blockdBin, t.TempDir(), "--object", "secret,id=z,file=/dev/zero")
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	case <-time.After(30 * time.Second):
		p.Kill()
		t.Fatal("blockd --object secret,file=/dev/zero did not exit")
	}
	if !strings.Contains(p.Logs(), "is not a regular file or FIFO") {
		t.Errorf("error output %q lacks the refusal", p.Logs())
	}
}

// TestNBDLimits checks max-connections and the handshake timeout.
func TestNBDLimits(t *testing.T) {
	start := func(t *testing.T, extra string) string {
		dir := t.TempDir()
		img := writeFile(t, filepath.Join(dir, "d.img"), make([]byte, 1<<20))
		sock := filepath.Join(dir, "nbd.sock")
		harness.StartDaemonIn(t, blockdBin, dir, "--blockdev", "driver=file,node-name=f,filename="+img,
			"--nbd-server", "addr.type=unix,addr.path="+sock+extra,
			"--export", "type=nbd,id=e,node-name=f,name=d")
		return sock
	}
	t.Run("max-connections", func(t *testing.T) {
		t.Parallel()
		sock := start(t, ",max-connections=2")
		a, err := harness.DialNBD("unix", sock, "d")
		if err != nil {
			t.Fatal(err)
		}
		b, err := harness.DialNBD("unix", sock, "d")
		if err != nil {
			t.Fatal(err)
		}
		if c, err := harness.DialNBD("unix", sock, "d"); err == nil {
			c.Close()
			t.Fatal("a third connection was served with max-connections=2")
		}
		a.Close()
		var c *harness.NBD
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if c, err = harness.DialNBD("unix", sock, "d"); err == nil || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			t.Fatalf("no connection after one of two closed: %v", err)
		}
		c.Close()
		b.Close()
	})
	for i, partial := range [][]byte{nil, {0, 0, 0, 1, 'I', 'H', 'A', 'V'}} {
		t.Run(fmt.Sprintf("handshake-timeout-%d", i), func(t *testing.T) {
			t.Parallel()
			sock := start(t, "")
			nc, err := net.Dial("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			begin := time.Now()
			nc.Write(partial)
			nc.SetReadDeadline(time.Now().Add(30 * time.Second))
			n, err := io.Copy(io.Discard, nc)
			el := time.Since(begin)
			nc.Close()
			if err != nil || el < 9*time.Second || el > 20*time.Second {
				t.Errorf("silent client after %d bytes: disconnected after %v (read %d bytes, %v), want about 10 s", len(partial), el, n, err)
			}
		})
	}
}
