package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"blockd/drivers/file"
	"blockd/drivers/luks"
	"blockd/graph"
	"blockd/secrets"
)

const demoSize = 64 << 20

// prepareDemo creates the demo's images in dir (once): a LUKS2 header in
// header.img and a 64 MiB payload in disk.img that carries no trace of
// encryption, with the passphrase in passphrase.txt. It returns the command
// line that serves them and a text telling how to reach them.
func prepareDemo(dir string) ([]string, string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, "", err
	}
	disk := filepath.Join(dir, "disk.img")
	hdr := filepath.Join(dir, "header.img")
	pass := filepath.Join(dir, "passphrase.txt")
	if _, err := os.Stat(hdr); os.IsNotExist(err) {
		if err := createDemo(disk, hdr, pass); err != nil {
			os.Remove(hdr)
			return nil, "", err
		}
	}
	qmpSock := filepath.Join(dir, "qmp.sock")
	nbdSock := filepath.Join(dir, "nbd.sock")
	args := []string{
		"--object", "secret,id=sec0,file=" + pass,
		"--blockdev", fmt.Sprintf(`{"driver":"file","node-name":"hdr","filename":%q}`, hdr),
		"--blockdev", fmt.Sprintf(`{"driver":"file","node-name":"data","filename":%q}`, disk),
		"--blockdev", `{"driver":"luks","node-name":"disk","file":"data","header":"hdr","key-secret":"sec0"}`,
		"--chardev", "socket,id=qmp0,path=" + qmpSock + ",server=on,wait=off",
		"--monitor", "chardev=qmp0",
		"--nbd-server", "addr.type=unix,addr.path=" + nbdSock,
		"--export", "type=nbd,id=exp0,node-name=disk,name=disk,writable=on",
	}
	uri := fmt.Sprintf("nbd+unix:///disk?socket=%s", nbdSock)
	info := fmt.Sprintf(`blockd demo: a 64 MiB LUKS2-encrypted disk with a detached header, exported over NBD.
  payload:    %s (ciphertext only, no LUKS header)
  header:     %s (passphrase in %s)
  NBD:        %s
  QMP socket: %s
Try:  nbdinfo '%s'
      nbdcopy '%s' - | head -c 64 | od -c
      cryptsetup luksDump %s
Press Ctrl-C to stop.
`, disk, hdr, pass, uri, qmpSock, uri, uri, hdr)
	return args, info, nil
}

// createDemo formats the demo volume with blockd's own luks driver and
// writes a greeting into the plaintext.
func createDemo(disk, hdr, passFile string) error {
	ctx := context.Background()
	pass := "blockd-demo"
	if err := os.WriteFile(passFile, []byte(pass), 0o600); err != nil {
		return err
	}
	for _, f := range []string{disk, hdr} {
		if err := os.WriteFile(f, nil, 0o600); err != nil {
			return err
		}
	}
	st := &secrets.Store{}
	if err := st.Add(secrets.Options{ID: "sec0", Data: &pass}); err != nil {
		return err
	}
	g := graph.New(st, file.Driver(), luks.Driver())
	defer g.Close()
	for _, n := range [][2]string{{"hdr", hdr}, {"data", disk}} {
		if _, err := g.Add(ctx, map[string]any{"driver": "file", "node-name": n[0], "filename": n[1]}, false); err != nil {
			return err
		}
	}
	drv, opts, err := g.DecodeCreateOptions(map[string]any{
		"driver": "luks", "header": "hdr", "file": "data", "size": json.Number(fmt.Sprint(demoSize)),
		"key-secret": "sec0", "luks-version": json.Number("2"), "iter-time": json.Number("200"),
	})
	if err != nil {
		return err
	}
	return createAndGreet(ctx, g, drv, opts)
}

func createAndGreet(ctx context.Context, g *graph.Graph, drv *graph.Driver, opts any) error {
	cc := g.NewCreateContext()
	err := drv.Create(ctx, cc, opts)
	cc.Release()
	if err != nil {
		return err
	}
	if _, err := g.Add(ctx, map[string]any{"driver": "luks", "node-name": "disk", "file": "data", "header": "hdr", "key-secret": "sec0"}, false); err != nil {
		return err
	}
	c, err := g.NewBackend("disk", "demo", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		return err
	}
	defer g.ReleaseBackend(c)
	if err := c.WriteAt(ctx, []byte("Hello from blockd: this sector is encrypted with LUKS2.\n"), 0, graph.FUA); err != nil {
		return err
	}
	return c.Flush(ctx)
}
