package ForkServer::Base::HugePages;
use strict;
use warnings;
no warnings 'portable';    # 64-bit addresses in hex

use Config ();

=head1 NAME

ForkServer::Base::HugePages - map the base's preloaded heap with huge pages, so that forking it is cheap

=head1 SYNOPSIS

  my ($mbytes, $why_not) = ForkServer::Base::HugePages::collapse();   # once, after loading, before serving

=head1 DESCRIPTION

Most of the time C<fork()> takes in a big process goes into copying its
page tables: one entry per 4 KB page, some 33,000 for the 134 MB of the
bench's heavy app (6 ms per fork on the project's machine). The base
vassal's memory is built once and then only read, so it asks the kernel
(C<madvise(MADV_COLLAPSE)>, Linux 6.1) to map its anonymous private memory
with 2 MB pages: one entry per 512 pages, and the same fork takes 1 ms.
Both forks of an adoption profit: the base's and the vassal's fork of its
first worker.

Memory stays shared as before: since Linux 5.8 a write to a huge page that
is shared copy-on-write splits the mapping and copies the one 4 KB page
written, not 2 MB. The mappings are not marked C<MADV_HUGEPAGE>, so memory
a vassal allocates later still comes in 4 KB pages. Only whole 2 MB-aligned
ranges are collapsed; where pages are missing the kernel fills them (the
heap of a loaded codebase is dense: the bench's heavy app grew by 56 KB).

x86_64 Linux only; anything else, a kernel without C<MADV_COLLAPSE> or
transparent huge pages turned off: nothing is done, and the reason is
returned.

Copying a loaded heap into huge pages costs the base 0.03-0.3 s of CPU
before it can serve, and more wall time on a busy machine. An operator
may start the Emperor with glibc's C<glibc.malloc.hugetlb=1> tunable in
C<GLIBC_TUNABLES> (not the default: side by side, 1,000 heavy vassals
answered in 20.91 s with it, 11.42 s without): malloc marks every area it grows C<MADV_HUGEPAGE>, the codebase
is faulted in 2 MB pages as it loads (some 1,500 faults instead of
31,000), and C<collapse> has next to nothing left to do. The tunable lives on in malloc's state after the fork,
so a vassal's own allocations would be marked too and each heap growth
would cost a vassal a 2 MB page of its own: C<settle> turns transparent
huge pages off for the base's children before it serves.

=cut

use constant {
    SYS_MADVISE        => 28,
    MADV_COLLAPSE      => 25,
    HUGE               => 2 * 1024 * 1024,
    SYS_PRCTL          => 157,
    PR_SET_THP_DISABLE => 41,
    HUGE_HEAP_TUNABLE  => 'glibc.malloc.hugetlb=1',
};

# what malloc read when perl started: ForkServer.pm keeps it before any
# app can change %ENV (glibc cuts the variable's bytes in the process's
# original environment, /proc/self/environ, at each ':')
my $HEAP_HUGE_FROM_START = grep { $_ eq HUGE_HEAP_TUNABLE } split /:/,
    ($ForkServer::GLIBC_TUNABLES_AT_START // $ENV{GLIBC_TUNABLES} // '');

=head2 heap_huge_from_start() -> $bool

Whether this process was started with malloc's heap in huge pages
(C<glibc.malloc.hugetlb=1> in C<GLIBC_TUNABLES>).

=cut

sub heap_huge_from_start { $HEAP_HUGE_FROM_START }

=head2 settle() -> $how

Once, after C<collapse> and before the first fork: the tunable taken out
of C<%ENV> (what vassals run never sees it), and, if the heap was huge from
the start, transparent huge pages turned off for this process and its
children (C<PR_SET_THP_DISABLE>, kept across fork and exec): the huge
pages already mapped stay, and are shared by every fork as before; memory
a vassal allocates comes in 4 KB pages, as with an ordinary malloc. Returns
what was done, for the log.

=cut

sub settle {
    if (defined $ENV{GLIBC_TUNABLES}) {
        my @rest = grep { $_ ne '' && $_ ne HUGE_HEAP_TUNABLE } split /:/, $ENV{GLIBC_TUNABLES};
        if (@rest) { $ENV{GLIBC_TUNABLES} = join ':', @rest } else { delete $ENV{GLIBC_TUNABLES} }
    }
    return '' unless $HEAP_HUGE_FROM_START;
    return syscall(SYS_PRCTL, PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
        ? 'heap huge from the start, none for vassals' : "heap huge from the start; PR_SET_THP_DISABLE: $!";
}

=head2 collapse() -> ($megabytes_collapsed, $why_not)

=cut

sub collapse {
    return (0, 'not x86_64 Linux') unless $^O eq 'linux' && ($Config::Config{archname} // '') =~ /^x86_64-/;
    open my $maps, '<', '/proc/self/maps' or return (0, "/proc/self/maps: $!");
    my @ranges;
    while (my $line = <$maps>) {
        my ($from, $to, $perm, $path) = $line =~ /^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*?)\s*$/ or next;
        # the malloc heap and anonymous mappings (big allocations, arenas);
        # not stacks, not files
        next unless $perm eq 'rw-p' && ($path eq '' || $path eq '[heap]');
        my $start = (hex($from) + HUGE - 1) & ~(HUGE - 1);
        my $end   = hex($to) & ~(HUGE - 1);
        push @ranges, [$start, $end - $start] if $end > $start;
    }
    close $maps;
    return (0, 'no 2 MB-aligned anonymous range') unless @ranges;
    my ($bytes, $err) = (0, undef);
    for my $r (@ranges) {
        if (syscall(SYS_MADVISE, $r->[0], $r->[1], MADV_COLLAPSE) == 0) { $bytes += $r->[1] }
        else { $err //= "$!" }
    }
    return (int($bytes / 1024 / 1024), $bytes ? undef : "madvise(MADV_COLLAPSE): $err");
}

1;
