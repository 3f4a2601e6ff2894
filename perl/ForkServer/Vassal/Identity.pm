package ForkServer::Vassal::Identity;
use strict;
use warnings;

use POSIX ();
use ForkServer::Process::Limits ();

=head1 NAME

ForkServer::Vassal::Identity - the user, group and groups a vassal runs as, and dropping root for them

=head1 SYNOPSIS

  my $id = ForkServer::Vassal::Identity::target($config);   # { uid, gid, groups => [...] } or undef: no change asked
  ForkServer::Vassal::Identity::drop($config);              # dies with one line unless every id is the target's
  my $now = ForkServer::Vassal::Identity::current();        # the same shape, this process's ids

=head1 DESCRIPTION

A vassal's C<uid> and C<gid> say whom it runs as:

=over

=item * C<uid> alone: that user's primary group (its passwd entry) and its
supplementary groups (every group that lists the user, as C<initgroups>
computes them). A numeric uid without a passwd entry needs C<gid>.

=item * C<uid> and C<gid>: the user's supplementary groups, with C<gid> as
the primary group.

=item * C<gid> alone: that group, no supplementary group but it; the uid
stays.

=back

L</drop> changes them in that order (groups, gid, uid: each step needs
root's rights the next one gives up), then reads the process's real,
effective, saved and file-system ids and its groups back from the kernel
(F</proc/self/status>, which shows what C<getresuid>, C<getresgid> and
C<getgroups> return) and dies unless each is the target's: no id of root's,
nor of the Emperor's groups, is left behind.

Without root, nothing can change: a vassal whose ids already are the
target's runs; any other refuses to start.

=cut

sub _user_groups {
    my ($name, $gid) = @_;
    my %seen = ($gid => 1);
    my @groups = ($gid);
    setgrent();
    while (my @g = getgrent()) {
        next unless grep { $_ eq $name } split ' ', ($g[3] // '');
        push @groups, $g[2] unless $seen{ $g[2] }++;
    }
    endgrent();
    return \@groups;
}

=head2 target($config) -> \%id or undef

The ids the config asks for, with C<groups> sorted; undef when it sets
neither C<uid> nor C<gid>. Dies with one line when they cannot be known.

=cut

sub target {
    my ($config) = @_;
    my ($uid, $gid) = ($config->get('uid'), $config->get('gid'));
    return undef unless defined $uid || defined $gid;
    if (!defined $uid) {
        return { uid => $<, gid => $gid, groups => [$gid] };
    }
    my @pw = getpwuid $uid;
    if (!@pw) {
        die "uid $uid has no passwd entry: give gid too\n" unless defined $gid;
        return { uid => $uid, gid => $gid, groups => [$gid] };
    }
    my $explicit = defined $gid;
    $gid //= $pw[3];
    my @groups = sort { $a <=> $b } @{ _user_groups($pw[0], $gid) };
    # root's group through the group file, not asked for by name or number
    die "uid $uid ($pw[0]) is a member of group 0 (root): give gid (gid = 0 keeps it)\n"
        if $uid != 0 && grep({ $_ == 0 } @groups) && !($explicit && $gid == 0);
    return { uid => $uid, gid => $gid, groups => \@groups };
}

=head2 current() -> \%id

This process's ids as the kernel holds them: C<uids> and C<gids> (real,
effective, saved, file system), C<uid>, C<gid> (the effective ones) and
C<groups>, sorted.

=cut

sub current {
    open my $fh, '<', '/proc/self/status' or die "reading /proc/self/status: $!\n";
    my %line;
    while (<$fh>) {
        $line{$1} = $2 if /\A(Uid|Gid|Groups):\s*(.*?)\s*\z/;
    }
    close $fh;
    my @uids = split ' ', $line{Uid} // '';
    my @gids = split ' ', $line{Gid} // '';
    die "no Uid or Gid line in /proc/self/status\n" unless @uids == 4 && @gids == 4;
    return { uids => \@uids, gids => \@gids, uid => $uids[1], gid => $gids[1],
             groups => [sort { $a <=> $b } split ' ', $line{Groups} // ''] };
}

=head2 same($a, $b) -> bool

Whether two ids (from L</target> or L</current>) are the same uid, gid and groups.

=cut

sub same {
    my ($x, $y) = @_;
    return $x->{uid} == $y->{uid} && $x->{gid} == $y->{gid}
        && "@{ $x->{groups} }" eq "@{ $y->{groups} }";
}

sub describe {
    my ($id) = @_;
    return "uid $id->{uid} gid $id->{gid} groups " . (@{ $id->{groups} } ? join(',', @{ $id->{groups} }) : 'none');
}

=head2 as_target($config, $code) -> what $code returns

Runs C<$code> with the target's groups, effective gid and effective uid,
then takes root's back: what it opens, it opens with the rights of the
user the vassal becomes (a path that user controls, a symlink it put
there, reaches nothing more). Without a target or without root, just runs
it.

=cut

sub as_target {
    my ($config, $code) = @_;
    my $want = target($config);
    return $code->() unless $want && $> == 0 && $< == 0;
    my $groups = $);
    $) = "$want->{gid} @{ $want->{groups} }";
    $> = $want->{uid};
    my @r = eval { $code->() };
    my $err = $@;
    $> = 0;
    $) = $groups;
    die "taking root back after opening as uid $want->{uid}: euid is $>\n" if $> != 0;
    die $err if $err;
    return wantarray ? @r : $r[0];
}

=head2 drop($config)

Becomes the config's L</target> (see L</DESCRIPTION>), or dies with one
line saying which id could not be given up.

=cut

sub drop {
    my ($config) = @_;
    my $want = target($config) // return;
    limit_processes($config);
    my $now = current();
    if ($now->{uids}[1] != 0) {    # nothing can change without root
        return if _holds_only($now, $want);
        die "cannot become " . describe($want) . ": running as " . describe($now) . ", not root\n";
    }
    my $gid = $want->{gid};
    # $) sets the effective gid and, with more numbers, calls setgroups()
    $) = "$gid @{ $want->{groups} }";
    POSIX::setgid($gid) or die "setgid($gid): $!\n";
    if ($want->{uid} != $now->{uid}) {
        POSIX::setuid($want->{uid}) or die "setuid($want->{uid}): $!\n";
    }
    $now = current();
    die "privileges not dropped: wanted " . describe($want) . ", the kernel says uids @{ $now->{uids} }, gids @{ $now->{gids} }, groups "
        . (@{ $now->{groups} } ? "@{ $now->{groups} }" : 'none') . "\n"
        unless _holds_only($now, $want);
    # A directory of @INC the user may not enter (a checkout in a 0700
    # home): perl's require stops there ("Permission denied") rather than
    # look further, and the app's `use` of an installed module would fail.
    @INC = grep { ref($_) || _enterable($_) } @INC;
    return;
}

=head2 limit_processes($config)

C<limit-nproc> (RLIMIT_NPROC, L<ForkServer::Process::Limits>) set before
the drop, so that nothing of the tenant's runs without it and none of its
processes can lift it; dies with one line if the kernel refuses it. 0: none.
Not set: a quarter of the machine's process slots
(L<ForkServer::Process::Limits/machine_share>).

=cut

sub limit_processes {
    my ($config) = @_;
    my $n = $config->get('limit-nproc') // ForkServer::Process::Limits::machine_share();
    return unless $n;
    defined ForkServer::Process::Limits::set_nproc($n) or die "limit-nproc $n: $!\n";
    return;
}

sub _enterable {
    my ($dir) = @_;
    return -x _ if stat $dir;
    return !$!{EACCES};
}

# every one of the four uids and gids is the target's, and the groups are its
sub _holds_only {
    my ($now, $want) = @_;
    return 0 if grep { $_ != $want->{uid} } @{ $now->{uids} };
    return 0 if grep { $_ != $want->{gid} } @{ $now->{gids} };
    return "@{ $now->{groups} }" eq "@{ $want->{groups} }";
}

1;
