use strict;
use warnings;
use Test::More;
use Socket ();
use POSIX ();
use ForkServer::Process::Dumpable ();
use ForkServer::Process::Syscalls ();

# A process that dropped root is not dumpable; restore_unprivileged sets the
# flag again only where nothing privileged is left: not as root, not with
# ids of two users, not as nobody (a uid unrelated daemons share).
plan skip_all => 'needs root: drops to other uids' unless $> == 0;
plan skip_all => 'no prctl here' unless defined ForkServer::Process::Dumpable::get();

# In a child: $setup, then what get() says, what restore_unprivileged()
# says, and get() again, as "before restored after".
sub in_child {
    my $setup = shift;
    pipe(my $r, my $w) or die "pipe: $!";
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        close $r;
        my $line = eval {
            $setup->();
            my $before = ForkServer::Process::Dumpable::get();
            my $restored = ForkServer::Process::Dumpable::restore_unprivileged() ? 1 : 0;
            "$before $restored " . ForkServer::Process::Dumpable::get();
        } // "error: $@";
        syswrite $w, $line;
        POSIX::_exit(0);
    }
    close $w;
    my $got = do { local $/; <$r> } // '';
    waitpid $pid, 0;
    return $got;
}

# a uid of nobody's in the passwd file is not needed for setuid
my $uid = 40000 + $$ % 20000;
my $nobody = do { open my $fh, '<', '/proc/sys/kernel/overflowuid'; my $n = <$fh> // 65534; $n + 0 };

is in_child(sub { $) = "$uid $uid"; POSIX::setgid($uid) or die "setgid: $!"; POSIX::setuid($uid) or die "setuid: $!" }),
    '0 1 1', 'one unprivileged uid and gid: dumpable again';
is in_child(sub { ForkServer::Process::Dumpable::get() }), '1 1 1', 'dumpable already: left so';
is in_child(sub { syscall(ForkServer::Process::Syscalls::number('prctl'), 4, 0, 0, 0, 0) == 0 or die "prctl: $!" }),
    '0 0 0', 'root: not';
is in_child(sub { $) = "0 0"; POSIX::setuid($uid) or die "setuid: $!" }),
    '0 0 0', 'gid 0: not';
is in_child(sub { $) = "$uid $uid"; POSIX::setgid($uid) or die; $> = $uid; $> == $uid or die "seteuid: $!" }),
    '0 0 0', 'root still its real and saved uid: not';
is in_child(sub { $) = "$nobody $nobody"; POSIX::setgid($nobody) or die; POSIX::setuid($nobody) or die "setuid: $!" }),
    '0 0 0', 'nobody: not';

# What a process opened as root and its new user may not open: named.
{
    require File::Temp;
    my $dir = File::Temp::tempdir(CLEANUP => 1);
    chmod 0755, $dir;
    my ($secret, $own, $public) = map { "$dir/$_" } qw(secret own public);
    for ([$secret, 0600, 0], [$own, 0600, $uid], [$public, 0644, 0]) {
        my ($path, $mode, $owner) = @$_;
        open my $fh, '>', $path or die "$path: $!";
        close $fh;
        chmod $mode, $path;
        chown $owner, $owner, $path;
    }
    pipe(my $r, my $w) or die "pipe: $!";
    # what the process was given before its app ran: this test's own pipes
    my %given = map { $_ => 1 } ForkServer::Process::Dumpable::pathless_links();
    my @held = map { open(my $fh, '<', $_) or die "$_: $!"; $fh } $secret, $own, $public;
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        close $r;
        $) = "$uid $uid";
        POSIX::setgid($uid) && POSIX::setuid($uid) or POSIX::_exit(1);
        my @foreign = ForkServer::Process::Dumpable::foreign_descriptors(\%given);
        close $held[0];
        my @after = ForkServer::Process::Dumpable::foreign_descriptors(\%given);
        # not given: a pipe and a socket pair (to a helper, say), a TCP socket
        pipe(my $pr, my $pw) or die "pipe: $!";
        socketpair(my $s1, my $s2, Socket::AF_UNIX(), Socket::SOCK_STREAM(), 0) or die "socketpair: $!";
        socket(my $tcp, Socket::AF_INET(), Socket::SOCK_STREAM(), 0) or die "socket: $!";
        my %named = map { /\A(\d+) \((\w+):.*, (.*)\)\z/ ? ($1 => "$2, $3") : () }
            ForkServer::Process::Dumpable::foreign_descriptors(\%given);
        syswrite $w, join("\n", "@foreign", "@after",
            join(' ', map { $named{fileno $_} // 'not named' } $pr, $pw, $s1, $s2, $tcp));
        POSIX::_exit(0);
    }
    close $w;
    my ($held, $after, $made) = split /\n/, do { local $/; <$r> } // '', -1;
    waitpid $pid, 0;
    is $held, fileno($held[0]) . " ($secret)", 'a root-only file opened as root: named; its own and a public one: not';
    is $after, '', 'none once it is closed';
    is $made, join(' ', ('pipe, a pipe it made as root') x 2, ('socket, a UNIX socket with no path') x 2, 'not named'),
        'a pipe and a socket pair not given: named; a TCP socket: not';
}
done_testing;
