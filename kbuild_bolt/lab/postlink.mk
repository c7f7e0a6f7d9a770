# SPDX-License-Identifier: GPL-2.0
# kbuild-bolt lab post-link hook, passed as `make ARCH_POSTLINK=<this file>`.
#
# 6.12's own x86 post-link pass derives vmlinux.relocs and then strips every
# .rela.* section from vmlinux. The lab keeps a copy taken right after the
# link (vmlinux.unstripped, with the relocations --emit-relocs kept) and then
# runs the kernel's own pass unchanged, so bzImage is built exactly as usual.

PHONY := __archpost
__archpost:

KERNEL_ARCH_POSTLINK := $(wildcard $(srctree)/arch/$(SRCARCH)/Makefile.postlink)

quiet_cmd_keep_unstripped = KEEP    $@.unstripped
      cmd_keep_unstripped = cp -f $@ $@.unstripped.tmp && mv -f $@.unstripped.tmp $@.unstripped

-include include/config/auto.conf
include $(srctree)/scripts/Kbuild.include

vmlinux: FORCE
	$(call cmd,keep_unstripped)
ifneq ($(KERNEL_ARCH_POSTLINK),)
	+$(Q)$(MAKE) -f $(KERNEL_ARCH_POSTLINK) $@
endif

clean:
	$(Q)rm -f vmlinux.unstripped
ifneq ($(KERNEL_ARCH_POSTLINK),)
	+$(Q)$(MAKE) -f $(KERNEL_ARCH_POSTLINK) $@
endif

PHONY += FORCE clean

FORCE:

.PHONY: $(PHONY)
