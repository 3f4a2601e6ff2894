package LateBaseReadyByte;
use strict;
use warnings;

# Loaded with PERL5OPT=-MLateBaseReadyByte: a base vassal sends its byte 1
# (ready) a second after its fork-server socket listens, as a base does
# when it is descheduled there on a busy machine. The Emperor may then see
# the socket accept before it reads the byte.
use ForkServer::Vassal::EmperorPipe ();
use ForkServer::Protocol qw(SPAWNED);
use Time::HiRes ();

my $send = \&ForkServer::Vassal::EmperorPipe::send;
{
    no warnings 'redefine';
    *ForkServer::Vassal::EmperorPipe::send = sub {
        my ($class, $fh, $byte) = @_;
        Time::HiRes::sleep(1) if $byte == SPAWNED && $0 =~ /\(fork server\)/;
        return $send->(@_);
    };
}

1;
