package ForkServer::Spares::EnvReads;
use strict;
use warnings;

use Tie::Hash ();
our @ISA = ('Tie::StdHash');

=head1 NAME

ForkServer::Spares::EnvReads - which %ENV keys a piece of code reads

=head1 SYNOPSIS

  my $keys = ForkServer::Spares::EnvReads::during(sub { warm_up() });   # ['HOME', 'TZ'], or ['*']

=head1 DESCRIPTION

Runs the code with C<%ENV> tied to a recorder, then gives C<%ENV> back,
with whatever the code set in it. The keys it fetched or tested with
C<exists>; C<*> when it walked the whole hash. Reads made in C (C<getenv>
from an XS module) are not seen. A spare's warm worker runs its warm-up so
(L<ForkServer::Spares::Worker>): a vassal is given it only if its C<%ENV>
holds the same for these keys.

=cut

my %read;

sub FETCH    { $read{ $_[1] } = 1; $_[0]->SUPER::FETCH($_[1]) }
sub EXISTS   { $read{ $_[1] } = 1; $_[0]->SUPER::EXISTS($_[1]) }
sub FIRSTKEY { $read{'*'} = 1; $_[0]->SUPER::FIRSTKEY() }

sub during {
    my ($code) = @_;
    my %copy = %ENV;
    %read = ();
    tie %ENV, __PACKAGE__;
    %ENV = %copy;
    %read = ();
    my $ok = eval { $code->(); 1 };
    my $err = $@;
    my %after = %{ tied %ENV };
    untie %ENV;
    %ENV = %after;
    die $err unless $ok;
    return $read{'*'} ? ['*'] : [sort keys %read];
}

1;
