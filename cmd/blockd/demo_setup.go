package main

import (
	"fmt"
	"os"
	"path/filepath"
)

// prepareDemo creates the demo's images in dir (once) and returns the
// command line that serves them and a text telling how to reach them.
func prepareDemo(dir string) ([]string, string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, "", err
	}
	disk := filepath.Join(dir, "disk.img")
	if _, err := os.Stat(disk); os.IsNotExist(err) {
		f, err := os.Create(disk)
		if err != nil {
			return nil, "", err
		}
		if _, err := f.WriteAt([]byte("blockd demo disk\n"), 0); err != nil {
			f.Close()
			return nil, "", err
		}
		if err := f.Truncate(64 << 20); err != nil {
			f.Close()
			return nil, "", err
		}
		f.Close()
	}
	qmpSock := filepath.Join(dir, "qmp.sock")
	nbdSock := filepath.Join(dir, "nbd.sock")
	args := []string{
		"--blockdev", fmt.Sprintf(`{"driver":"raw","node-name":"disk","file":{"driver":"file","filename":%q}}`, disk),
		"--chardev", "socket,id=qmp0,path=" + qmpSock + ",server=on,wait=off",
		"--monitor", "chardev=qmp0",
		"--nbd-server", "addr.type=unix,addr.path=" + nbdSock,
		"--export", "type=nbd,id=exp0,node-name=disk,name=disk,writable=on",
	}
	info := fmt.Sprintf(`blockd demo: a 64 MiB disk exported over NBD.
  NBD:  nbd+unix:///disk?socket=%s   (try: nbdinfo 'nbd+unix:///disk?socket=%s')
  QMP:  %s
Press Ctrl-C to stop.
`, nbdSock, nbdSock, qmpSock)
	return args, info, nil
}
