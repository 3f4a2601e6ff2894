package ForkServer::Process::Syscalls;
use strict;
use warnings;

# System call numbers from h2ph's syscall.ph. It defines them as subs of
# the package that first requires it, once per process: a second module
# (or an app loaded before us) requiring it got nothing, silently. They are
# loaded here, in this package, whoever required the files before.

my $LOADED = eval {
    local $SIG{__WARN__} = sub { };
    delete local @INC{ grep { /\.ph\z/ } keys %INC };
    require 'syscall.ph';
    1;
};

# The number of system call $name (as in SYS_$name), or undef.
sub number {
    my $name = shift;
    return undef unless $LOADED;
    my $sub = __PACKAGE__->can("SYS_$name") or return undef;
    my $n = eval { $sub->() };
    return $n;
}

1;

__END__

=head1 NAME

ForkServer::Process::Syscalls - system call numbers, whoever loaded syscall.ph first

=head1 FUNCTIONS

=head2 number($name) -> $number

C<number('memfd_create')>: the number C<syscall()> takes, or undef where
C<syscall.ph> does not define it.

=cut
