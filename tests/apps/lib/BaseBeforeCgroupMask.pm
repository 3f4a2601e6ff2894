package BaseBeforeCgroupMask;
use strict;
use warnings;

# Loaded with PERL5OPT=-MBaseBeforeCgroupMask: a base vassal that refuses an
# adoption request carrying a cgroup directory (mask bit 0x08) as a base of
# an earlier version does, one started before the Emperor was upgraded.
use ForkServer::Base::Request ();

my $validate = \&ForkServer::Base::Request::_validate;
{
    no warnings 'redefine';
    *ForkServer::Base::Request::_validate = sub {
        my ($self, $mask) = @_;
        die sprintf("unknown mask bits 0x%02x\n", $mask) if $mask & 0x08;
        return $validate->(@_);
    };
}

1;
