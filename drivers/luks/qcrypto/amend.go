package qcrypto

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"blockd/drivers/luks/luksfmt"
)

// KeyslotState is QCryptoBlockLUKSKeyslotState.
type KeyslotState string

// EnumValues implements qapi.Enum.
func (KeyslotState) EnumValues() []string { return []string{"active", "inactive"} }

// AmendOptions is QCryptoBlockAmendOptionsLUKS, plus blockd's pbkdf
// extension for the new keyslot (LUKS2).
type AmendOptions struct {
	State     KeyslotState `json:"state"`
	NewSecret *string      `json:"new-secret,omitempty"`
	OldSecret *string      `json:"old-secret,omitempty"`
	Keyslot   *int64       `json:"keyslot,omitempty"`
	IterTime  *int64       `json:"iter-time,omitempty"`
	Secret    *string      `json:"secret,omitempty"`
	PBKDF     *PBKDFAlg    `json:"pbkdf,omitempty"`
}

// Keyslots is a LUKS header whose keyslots can be amended: a luks node's,
// or the one inside an encrypted qcow2 image.
type Keyslots struct {
	Header *luksfmt.Header
	// KeySecret is the ID of the secret that opened the image, used to
	// unlock the volume key unless the options name another.
	KeySecret string
	Secret    func(id string) ([]byte, error)
	// Limits bound unlocking the header's keyslots (zero: the defaults).
	Limits luksfmt.KDFLimits
	// Writer gives access to the header's storage while it changes.
	Writer func(ctx context.Context) (io.WriterAt, func(), error)
}

// Amend adds or erases keyslots (QEMU's qcrypto_block_luks_amend_options).
// Its luksfmt errors also match graph's sentinels (GraphError).
func (k *Keyslots) Amend(ctx context.Context, o *AmendOptions, force bool) error {
	if o.State == "active" {
		return GraphError(k.addKeyslot(ctx, o, force))
	}
	return GraphError(k.eraseKeyslots(ctx, o, force))
}

func (k *Keyslots) addKeyslot(ctx context.Context, o *AmendOptions, force bool) error {
	if o.NewSecret == nil {
		return errors.New("'new-secret' is required to activate a keyslot")
	}
	if o.OldSecret != nil {
		return errors.New("'old-secret' must not be given when activating keyslots")
	}
	max := k.Header.MaxSlots()
	slot := luksfmt.AnySlot
	active := map[int]bool{}
	for _, s := range k.Header.ActiveSlots() {
		active[s] = true
	}
	if o.Keyslot != nil {
		if *o.Keyslot < 0 || *o.Keyslot >= int64(max) {
			return fmt.Errorf("Invalid keyslot %d specified, must be between 0 and %d", uint32(*o.Keyslot), max-1)
		}
		slot = int(*o.Keyslot)
	} else if len(active) == max {
		return errors.New("Can't add a keyslot - all keyslots are in use")
	}
	if slot != luksfmt.AnySlot && active[slot] {
		if !force {
			return fmt.Errorf("Refusing to overwrite active keyslot %d - please erase it first", slot)
		}
	}
	unlockID := k.KeySecret
	if o.Secret != nil {
		unlockID = *o.Secret
	}
	oldPass, err := k.Secret(unlockID)
	if err != nil {
		return err
	}
	key, _, err := k.Header.Unlock(ctx, oldPass, luksfmt.AnySlot, k.Limits)
	luksfmt.Wipe(oldPass)
	if err != nil {
		return err
	}
	defer luksfmt.Wipe(key)
	newPass, err := k.Secret(*o.NewSecret)
	if err != nil {
		return err
	}
	defer luksfmt.Wipe(newPass)
	kdf := luksfmt.KDF{IterTime: luksfmt.DefaultIterTime}
	if o.IterTime != nil {
		if *o.IterTime <= 0 {
			return errors.New("iter-time must be positive")
		}
		kdf.IterTime = time.Duration(*o.IterTime) * time.Millisecond
	}
	if o.PBKDF != nil {
		kdf.Type = string(*o.PBKDF)
	}
	w, release, err := k.Writer(ctx)
	if err != nil {
		return err
	}
	defer release()
	if slot != luksfmt.AnySlot && active[slot] {
		if err := k.Header.KillSlot(w, slot); err != nil {
			return err
		}
	}
	_, err = k.Header.AddKey(w, key, slot, newPass, kdf)
	return err
}

func (k *Keyslots) eraseKeyslots(ctx context.Context, o *AmendOptions, force bool) error {
	if o.NewSecret != nil {
		return errors.New("'new-secret' must not be given when erasing keyslots")
	}
	if o.IterTime != nil {
		return errors.New("'iter-time' must not be given when erasing keyslots")
	}
	if o.Secret != nil {
		return errors.New("'secret' must not be given when erasing keyslots")
	}
	var oldPass []byte
	if o.OldSecret != nil {
		p, err := k.Secret(*o.OldSecret)
		if err != nil {
			return err
		}
		oldPass = p
		defer luksfmt.Wipe(oldPass)
	}
	active := k.Header.ActiveSlots()
	isActive := func(s int) bool {
		for _, a := range active {
			if a == s {
				return true
			}
		}
		return false
	}
	var erase []int
	switch {
	case o.Keyslot != nil:
		max := k.Header.MaxSlots()
		slot := *o.Keyslot
		if slot < 0 || slot >= int64(max) {
			return fmt.Errorf("Invalid keyslot %d specified, must be between 0 and %d", slot, max-1)
		}
		if oldPass != nil {
			key, _, err := k.Header.Unlock(ctx, oldPass, int(slot), k.Limits)
			if err != nil {
				if errors.Is(err, luksfmt.ErrWrongPassphrase) || errors.Is(err, luksfmt.ErrSlotInactive) {
					return fmt.Errorf("Given keyslot %d doesn't contain the given old password for erase operation", slot)
				}
				return err
			}
			luksfmt.Wipe(key)
		}
		if !force && !isActive(int(slot)) {
			return fmt.Errorf("Given keyslot %d is already erased (inactive) ", slot)
		}
		if !force && len(active) == 1 {
			return fmt.Errorf("Attempt to erase the only active keyslot %d which will erase all the data in the image irreversibly - refusing operation", slot)
		}
		if isActive(int(slot)) {
			erase = []int{int(slot)}
		}
	case oldPass != nil:
		m, err := k.Header.MatchSlots(ctx, oldPass, k.Limits)
		if err != nil {
			return err
		}
		if len(m) == 0 {
			return errors.New("No keyslots match given (old) password for erase operation")
		}
		if !force && len(m) == len(active) {
			return errors.New("All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation")
		}
		erase = m
	default:
		return errors.New("To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given")
	}
	if len(erase) == 0 {
		return nil
	}
	w, release, err := k.Writer(ctx)
	if err != nil {
		return err
	}
	defer release()
	for _, s := range erase {
		if err := k.Header.KillSlot(w, s); err != nil {
			return err
		}
	}
	return nil
}
